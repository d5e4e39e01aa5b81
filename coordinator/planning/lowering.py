"""Shards in lower precision (:mod:`coordinator.planning.precision`), made with onnxruntime's own quantization
tools and cached by content hash.

::

    fp32  the export as it is
    fp16  onnxruntime.transformers.float16.convert_float_to_float16(keep_io_types=True): weights and compute
          in float16; inputs and outputs stay float32, so the wire, the neighbours and a KV cache do too
    q8    onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer(bits=8, block_size=32,
          asymmetric): MatMulNBits, 8-bit weights with a float32 scale and an 8-bit zero point per block of 32;
          activations stay float32. (Dynamic int8, ``quantize_dynamic``'s MatMulInteger, quantizes each
          activation per tensor at each call and kept 62.5% of SmolLM2's next-token argmaxes in the pages:
          its hidden states carry outliers in a few channels. Weight-only 8 bits keeps 98.5% natively.)
    q4    onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer, block_size=32: MatMulNBits,
          4-bit weights with a float32 scale per block of 32. Two recipes (``precision.Recipe``): HQQ (a float
          zero point per block too; runs in torch, the ``convert`` extra), and for a shard that is to run on
          WebGPU, round-to-nearest symmetric (no zero points). The language-model head (the MatMul that makes
          ``logits``) stays float32, as llama.cpp and Transformers.js keep theirs above 4 bits: on SmolLM2 in
          native onnxruntime, 4 bits everywhere kept 86.0% of 200 next-token argmaxes, every MatMul but the
          head 100.0% (its GGUF holds the layers in 4-bit blocks HQQ finds again, the head in 8 bits); and the
          head is where 4 bits is slowest on WASM (576x49152: 47.8 ms against 3.8 ms in float32).

Each makes a new shard from a float32 one; inputs and outputs keep their names, dtypes and shapes, so a shard
of any precision drops into the plan in place of its float32 original. Embeddings (Gather) stay float32.

``lower_shard(shard_dir, sha256, precision)`` returns the new shard's sha256 in the same content-addressed
store (``<sha256>.onnx``, with a sidecar past 2 GB, :mod:`coordinator.model.external`). Which shard a float32
one becomes is remembered in ``<shard_dir>/lowered/<sha256>.<precision>.json``, keyed also by ``RECIPE`` and
the onnxruntime version (whose quantizers make the bytes), so a second run quantizes nothing.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import onnx

from broker.shardfiles import data_files
from coordinator.errors import ConversionError
from coordinator.model.external import needs_external_data, save_external, store_external_shard
from coordinator.planning.precision import Precision, Recipe
from coordinator.planning.shardset import store

log = logging.getLogger(__name__)

RECIPE = "xshard-precision-4"  # bump whenever a recipe below changes: lowered shards are cached by it
BLOCK_SIZE = 32  # weights per scale (and zero point) in q8 and q4
HEAD_OUTPUTS = frozenset({"logits"})  # a language-model head's output (causal LMs, Whisper's decoder)


def lower_shard(shard_dir: Path, sha256: str, recipe: Recipe) -> str:
    """The sha256 of shard ``sha256`` made by ``recipe`` (made once, then read from the index)."""
    if recipe is Recipe.FP32:
        return sha256
    index = _index_path(shard_dir, sha256, recipe)
    if index.is_file():
        lowered = json.loads(index.read_text()).get("sha256", "")
        if (shard_dir / f"{lowered}.onnx").is_file():
            return str(lowered)
    model = onnx.load(str(shard_dir / f"{sha256}.onnx"), load_external_data=True)
    try:
        lowered_model = _lower(model, recipe)
    except Exception as e:  # the quantizers raise whatever their graph walks meet
        raise ConversionError(f"onnxruntime's {recipe.value} quantizer failed on shard {sha256[:12]}: {e}") from e
    digest = _store(lowered_model, shard_dir)
    index.parent.mkdir(parents=True, exist_ok=True)
    _write_json(index, {"sha256": digest, "source": sha256, "recipe": recipe.value, "version": _recipe()})
    log.info("shard %s by %s: %s", sha256[:12], recipe.value, digest[:12])
    return digest


def _recipe() -> str:
    import onnxruntime

    return f"{RECIPE}/onnxruntime-{onnxruntime.__version__}"


def _index_path(shard_dir: Path, sha256: str, recipe: Recipe) -> Path:
    version = _recipe().replace("/", "_")
    return shard_dir / "lowered" / f"{sha256}.{recipe.value}.{version}.json"


def _lower(model: onnx.ModelProto, recipe: Recipe) -> onnx.ModelProto:
    with _quiet_quantizers():
        if recipe is Recipe.FP16:
            from onnxruntime.transformers.float16 import convert_float_to_float16

            return convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True)
        from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer

        heads = model_heads(model)
        if recipe is Recipe.Q4_HQQ:
            config = HQQWeightOnlyQuantConfig(block_size=BLOCK_SIZE, bits=4)
            quantizer = MatMulNBitsQuantizer(model, algo_config=config, nodes_to_exclude=heads)
        else:
            bits, symmetric = (4, True) if recipe is Recipe.Q4_RTN else (8, False)
            quantizer = MatMulNBitsQuantizer(
                model, bits=bits, block_size=BLOCK_SIZE, is_symmetric=symmetric, nodes_to_exclude=heads
            )
        quantizer.process()
        return quantizer.model.model


def model_heads(model: onnx.ModelProto) -> list[str]:
    """The MatMuls with a constant weight that make a ``HEAD_OUTPUTS`` output of the graph: kept float32 in q8
    and q4."""
    constants, outputs = _constants(model), _head_outputs(model)
    return [n.name for n in model.graph.node if _weight_matmul(n, constants) and set(n.output) & outputs]


def _constants(model: onnx.ModelProto) -> set[str]:
    return {t.name for t in model.graph.initializer}


def _head_outputs(model: onnx.ModelProto) -> set[str]:
    return {o.name for o in model.graph.output} & HEAD_OUTPUTS


def _weight_matmul(node: onnx.NodeProto, constants: set[str]) -> bool:
    """A MatMul whose weight (its second input) is a constant: what q8 and q4 quantize."""
    return node.op_type == "MatMul" and len(node.input) > 1 and node.input[1] in constants


def _store(model: onnx.ModelProto, shard_dir: Path) -> str:
    if not needs_external_data(model):
        return store(shard_dir, model.SerializeToString())
    with tempfile.TemporaryDirectory(dir=shard_dir, prefix=".lower-") as scratch:
        path = Path(scratch) / "shard.onnx"
        save_external(model, path)
        return store_external_shard(onnx.load(str(path), load_external_data=False), Path(scratch), shard_dir)


def _write_json(path: Path, value: dict[str, str]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        json.dump(value, f)
    os.replace(tmp, path)


@contextmanager
def _quiet_quantizers() -> Iterator[None]:
    """onnxruntime's quantizers log every tensor at INFO on the root logger; keep that at WARNING."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        root.setLevel(level)


#: Bytes per float32 weight byte of a MatMul's constant weight in each precision (q4: 4 bits, a float32 scale
#: and a 4-bit zero point per 32; q8: 8 bits, a float32 scale and an 8-bit zero point per 32); fp16 halves every
#: float weight.
MATMUL_WEIGHT_SHARE = {Precision.FP32: 1.0, Precision.FP16: 0.5, Precision.Q8: 0.29, Precision.Q4: 0.16}


def lowered_weight_bytes(model: onnx.ModelProto, node_weight_bytes: Sequence[int], precision: Precision) -> list[int]:
    """Each node's weight bytes once in ``precision`` (an estimate from ``MATMUL_WEIGHT_SHARE``, for sizing
    before any shard is lowered): a MatMul's constant weight shrinks by its share (not a head's), other
    weights only in fp16."""
    if precision is Precision.FP32:
        return list(node_weight_bytes)
    constants = _constants(model)
    heads = _head_outputs(model) if precision in (Precision.Q4, Precision.Q8) else set()
    out = []
    for node, weight in zip(model.graph.node, node_weight_bytes, strict=True):
        matmul = _weight_matmul(node, constants) and not set(node.output) & heads
        share = MATMUL_WEIGHT_SHARE[precision] if matmul else (0.5 if precision is Precision.FP16 else 1.0)
        out.append(int(weight * share))
    return out


def stored_bytes(shard_dir: Path, sha256: str) -> int:
    """What a stored shard takes: its graph file and any external data files it names."""
    total = (shard_dir / f"{sha256}.onnx").stat().st_size
    return total + sum(f.size_bytes for f in data_files(shard_dir, sha256))
