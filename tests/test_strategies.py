"""The guide's model types and its other two strategies: component DAGs and attention/feed-forward.

Tiny random CLIP, ViT, Whisper, RoBERTa and BERT models are built from transformers' classes, saved as
Hugging Face directories and converted by the real converter (which verifies them against transformers).
Their shard files, cut by the planner, are run with native onnxruntime in the plan's order (a DAG's stages
reading only what their upstream stages produced) and compared with transformers within 1e-4.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import pytest

from coordinator.errors import InputError, PlanError
from coordinator.model.components import order_by_component
from coordinator.model.export.common import padded_batch
from coordinator.model.graph import load_model, profile_graph
from coordinator.model.modality import cosine_similarity
from coordinator.model.resolve import resolve_model
from coordinator.model.validation import validate_inputs
from coordinator.planning.allocation import allocate
from coordinator.planning.recommendations import BrowserStat, allocate_from_history
from coordinator.planning.shardset import ShardSet, build_shard_set
from tests import modality_models as mm

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

TOLERANCE = 1e-4
BUILDERS: dict[str, Any] = {
    "clip": mm.save_tiny_clip,
    "vit": mm.save_tiny_vit,
    "whisper": mm.save_tiny_whisper,
    "roberta1": lambda d: mm.save_tiny_roberta(d, layers=1),
    "roberta2": lambda d: mm.save_tiny_roberta(d, layers=2),
    "bert1": lambda d: mm.save_tiny_bert(d, layers=1),
    "bert2": lambda d: mm.save_tiny_bert(d, layers=2),
    "bert3": lambda d: mm.save_tiny_bert(d, layers=3),
}


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("strategies-cache")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, cache: Path) -> dict[str, Any]:
    """name -> (hf_dir, ResolvedModel), converted once through the content-hash cache."""
    root = tmp_path_factory.mktemp("strategies-hf")
    out = {}
    for name, save in BUILDERS.items():
        hf_dir = save(root / name)
        out[name] = (hf_dir, resolve_model(str(hf_dir), cache))
    return out


def _feeds(name: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    if name == "clip":
        ids, mask = padded_batch(2, 9, mm.VOCAB, seed=3)
        pixels = rng.standard_normal((3, mm.CHANNELS, mm.IMAGE_SIZE, mm.IMAGE_SIZE)).astype(np.float32)
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}
    if name == "vit":
        return {"pixel_values": rng.standard_normal((2, mm.CHANNELS, mm.IMAGE_SIZE, mm.IMAGE_SIZE)).astype(np.float32)}
    if name == "whisper":
        return {"input_features": rng.standard_normal((2, mm.MEL_BINS, 2 * mm.AUDIO_POSITIONS)).astype(np.float32)}
    ids, mask = padded_batch(2, 11, mm.VOCAB, seed=3)
    return {"input_ids": ids, "attention_mask": mask}


def _expected(name: str, hf_dir: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What transformers itself computes."""
    import transformers

    auto = {
        "clip": transformers.AutoModel,
        "vit": transformers.AutoModelForImageClassification,
        "whisper": transformers.AutoModelForSpeechSeq2Seq,
    }.get(name, transformers.AutoModel)
    model = auto.from_pretrained(str(hf_dir), local_files_only=True, attn_implementation="eager").eval()
    if name == "whisper":
        model = model.get_encoder()
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}, return_dict=True)
    keys = {
        "clip": ("logits_per_image", "logits_per_text", "text_embeds", "image_embeds"),
        "vit": ("logits",),
    }.get(name, ("last_hidden_state",))
    return {k: getattr(out, k).numpy() for k in keys}


def _run_plan(shards: ShardSet, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run each stage on what the request and its ancestors (only those) produced: a chain carries all
    before it, a DAG's tower nothing of the other tower."""
    produced: dict[int, dict[str, np.ndarray]] = {}
    ancestors: dict[int, set[int]] = {}
    for stage in shards.plan.stages:
        ancestors[stage.index] = set(stage.upstream).union(*(ancestors[u] for u in stage.upstream))
        available = dict(feeds)
        for up in sorted(ancestors[stage.index]):
            available.update(produced[up])
        session = onnxruntime.InferenceSession(str(shards.path(stage.index)), providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        outputs = session.run(names, {n: available[n] for n in stage.input_names})
        produced[stage.index] = dict(zip(names, outputs, strict=True))
    return {k: v for outs in produced.values() for k, v in outs.items()}


CASES = [
    ("clip", 3, "component"),
    ("clip", 4, "component"),
    ("vit", 2, "layer"),
    ("whisper", 2, "layer"),
    ("roberta1", 2, "attention_feedforward"),
    ("roberta2", 2, "attention_feedforward"),
    ("roberta2", 4, "attention_feedforward"),
    ("bert1", 2, "attention_feedforward"),
    ("bert2", 2, "attention_feedforward"),
    ("bert2", 4, "attention_feedforward"),
    ("bert3", 4, "attention_feedforward"),
    ("bert3", 6, "attention_feedforward"),
]


@pytest.mark.parametrize(("name", "num_shards", "shard_type"), CASES)
def test_sharded_model_matches_transformers(
    models: dict[str, Any], cache: Path, name: str, num_shards: int, shard_type: str
) -> None:
    hf_dir, resolved = models[name]
    shards = build_shard_set(resolved.onnx_path, num_shards, shard_type, cache)
    assert len(shards.plan.shard_groups) == num_shards
    feeds = validate_inputs(_feeds(name), shards.profile.inputs, shards.profile.vocab_limits)
    got = _run_plan(shards, feeds)
    for key, want in _expected(name, hf_dir, feeds).items():
        assert got[key].shape == want.shape, key
        assert float(np.max(np.abs(got[key] - want))) <= TOLERANCE, key


def test_model_types_convert_once_by_content_hash(models: dict[str, Any], cache: Path) -> None:
    kinds = {name: resolved.kind for name, (_, resolved) in models.items()}
    assert kinds["clip"] == "multimodal" and kinds["vit"] == "vision" and kinds["whisper"] == "audio"
    assert kinds["roberta1"] == kinds["bert2"] == "encoder"
    hf_dir, first = models["vit"]
    mtime_ns = first.onnx_path.stat().st_mtime_ns
    again = resolve_model(str(hf_dir), cache)
    assert again.onnx_path == first.onnx_path and again.onnx_path.stat().st_mtime_ns == mtime_ns


def test_clip_components_form_a_dag_with_two_independent_towers(models: dict[str, Any], cache: Path) -> None:
    for num_shards in (3, 4):
        plan = build_shard_set(models["clip"][1].onnx_path, num_shards, "component", cache).plan
        assert not plan.is_chain
        heads = [s for s in plan.stages if not s.upstream]
        assert sorted(s.kind for s in heads) == ["text", "vision"]
        fusion = plan.stages[-1]
        assert fusion.kind == "fusion"
        assert {plan.stages[i].kind for i in fusion.upstream} == {"text", "vision"}
        assert len([s for s in plan.stages if s.kind != "fusion"]) == num_shards - 1


def test_attention_feedforward_stages_alternate_kinds(models: dict[str, Any], cache: Path) -> None:
    plan = build_shard_set(models["bert2"][1].onnx_path, 4, "attention_feedforward", cache).plan
    assert [s.kind for s in plan.stages] == ["attention", "feedforward", "attention", "feedforward"]
    assert plan.shard_groups == ((0,), (1,), (2,), (3,))
    assert plan.is_chain


@pytest.mark.parametrize(("num_shards", "sizes"), [(2, [3]), (4, [1, 2]), (6, [1, 1, 1])])
def test_attention_feedforward_shards_hold_ranges_of_layers_one_kind_each(
    models: dict[str, Any], cache: Path, num_shards: int, sizes: list[int]
) -> None:
    """Fewer shards than blocks (the guide's T5-Large: 24 layers in 6 shards): each range of layers is an
    attention shard and a feed-forward shard, and a request alternates between them, layer after layer."""
    plan = build_shard_set(models["bert3"][1].onnx_path, num_shards, "attention_feedforward", cache).plan
    assert len(plan.stages) == 6 and len(plan.shard_groups) == num_shards
    assert sorted(i for g in plan.shard_groups for i in g) == list(range(6))
    for g, members in enumerate(plan.shard_groups):
        kinds = {plan.stages[i].kind for i in members}
        assert kinds == {"attention" if g % 2 == 0 else "feedforward"}, (g, members)
        assert all(plan.group_of(i) == g for i in members)
    attention_shards = plan.shard_groups[0::2]
    assert sorted(len(g) for g in attention_shards) == sorted(sizes)
    layers = [[i // 2 for i in g] for g in attention_shards]  # consecutive ranges, in order
    assert [x for r in layers for x in r] == [0, 1, 2]
    assert [[i // 2 for i in g] for g in plan.shard_groups[1::2]] == layers


def test_attention_feedforward_with_more_shards_than_blocks_is_refused(models: dict[str, Any], cache: Path) -> None:
    with pytest.raises(PlanError, match="at most 4 shards.*got 6"):
        build_shard_set(models["bert2"][1].onnx_path, 6, "attention_feedforward", cache)


def test_clip_similarity_is_the_cosine_of_each_text_with_each_image(models: dict[str, Any]) -> None:
    hf_dir, _ = models["clip"]
    feeds = _feeds("clip")
    expected = _expected("clip", hf_dir, feeds)
    similarity = cosine_similarity(expected["text_embeds"], expected["image_embeds"])
    assert similarity.shape == (2, 3)
    import transformers

    scale = float(transformers.AutoModel.from_pretrained(str(hf_dir), local_files_only=True).logit_scale.detach().exp())
    assert np.allclose(similarity * scale, expected["logits_per_text"], atol=1e-4)


@pytest.mark.parametrize(
    ("name", "inputs", "message"),
    [
        ("vit", {"pixel_values": np.zeros((1, 3, 8, 8), np.float32)}, "axis 2 (height) must be 16"),
        ("vit", {"pixel_values": np.zeros((1, 1, 16, 16), np.float32)}, "axis 1 (channels) must be 3"),
        ("whisper", {"input_features": np.zeros((1, 80, 16), np.float32)}, "axis 1 (mel bins) must be 8"),
    ],
)
def test_wrong_pixel_values_and_mel_bins_are_refused(
    models: dict[str, Any], name: str, inputs: dict[str, np.ndarray], message: str
) -> None:
    model, sha = load_model(models[name][1].onnx_path)
    profile = profile_graph(model, sha)
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_inputs(inputs, profile.inputs, profile.vocab_limits)


def test_component_on_a_single_input_text_model_is_refused(models: dict[str, Any], cache: Path) -> None:
    with pytest.raises(PlanError, match="at least two independent data inputs"):
        build_shard_set(models["roberta2"][1].onnx_path, 3, "component", cache)
    with pytest.raises(PlanError, match="at least two independent data inputs"):
        order_by_component(onnx.load(str(models["vit"][1].onnx_path)))


def test_clip_by_component_with_too_few_shards_is_refused(models: dict[str, Any], cache: Path) -> None:
    with pytest.raises(PlanError, match=r"at least 3 shards \(text, vision, fusion\), got 2"):
        build_shard_set(models["clip"][1].onnx_path, 2, "component", cache)


def test_attention_feedforward_with_odd_num_shards_is_refused(models: dict[str, Any], cache: Path) -> None:
    with pytest.raises(PlanError, match="even num_shards.*got 3"):
        build_shard_set(models["bert2"][1].onnx_path, 3, "attention_feedforward", cache)


def test_attention_feedforward_on_a_graph_without_attention_is_refused(tmp_path: Path) -> None:
    path = _mlp_stack(tmp_path / "mlp.onnx", layers=4)
    with pytest.raises(PlanError, match="needs a graph with attention blocks"):
        build_shard_set(path, 2, "attention_feedforward", tmp_path)


def _mlp_stack(path: Path, layers: int, hidden: int = 16) -> Path:
    """x -> layers x (x + relu(x @ W1) @ W2): residual blocks with no attention."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, weights, x = [], [], "x"
    for i in range(layers):
        w1, w2 = f"w1_{i}", f"w2_{i}"
        weights += [
            numpy_helper.from_array(rng.standard_normal((hidden, 2 * hidden)).astype(np.float32), w1),
            numpy_helper.from_array(rng.standard_normal((2 * hidden, hidden)).astype(np.float32), w2),
        ]
        nodes += [
            helper.make_node("MatMul", [x, w1], [f"h{i}"]),
            helper.make_node("Relu", [f"h{i}"], [f"r{i}"]),
            helper.make_node("MatMul", [f"r{i}", w2], [f"o{i}"]),
            helper.make_node("Add", [x, f"o{i}"], [f"x{i}"]),
        ]
        x = f"x{i}"
    nodes.append(helper.make_node("Identity", [x], ["y"]))
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", hidden])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", hidden])],
        weights,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_guide_table_chooses_the_browser_per_component_and_history_overrides_it(
    models: dict[str, Any], cache: Path
) -> None:
    plan = build_shard_set(models["clip"][1].onnx_path, 3, "component", cache).plan
    kinds = tuple(s.kind for s in plan.stages)
    slots = allocate(3, model_type="multimodal", model_kind="multimodal", installed=lambda b: True, stage_kinds=kinds)
    assert [(slots[i].specialization, slots[i].browser) for i in range(3)] == [
        ("text", "edge"),
        ("vision", "chromium"),
        ("fusion", "chromium"),
    ]
    assert "guide table: multimodal vision -> chrome" in slots[1].reason
    no_edge = allocate(
        3, model_type="multimodal", model_kind="multimodal", installed=lambda b: b != "edge", stage_kinds=kinds
    )
    assert no_edge[0].browser == "chromium" and "Edge is not installed" in no_edge[0].reason
    stats = [
        BrowserStat("firefox", "wasm", 20, 20, 5.0, 6.0, 5.0, shard_type="component", shard_index=1),
        BrowserStat("chromium", "wasm", 20, 20, 9.0, 10.0, 9.0, shard_type="component", shard_index=1),
    ]
    steered = allocate_from_history(slots, stats)
    assert steered[1].browser == "firefox" and steered[1].specialization == "vision"
    assert "the data overrides the earlier choice (guide table: multimodal vision" in steered[1].reason
    assert steered[0] == slots[0] and steered[2] == slots[2]  # no measurements for those shards


def test_attention_and_feedforward_shards_name_their_specialization_and_custom_wins(
    models: dict[str, Any], cache: Path
) -> None:
    plan = build_shard_set(models["bert2"][1].onnx_path, 4, "attention_feedforward", cache).plan
    kinds = tuple(s.kind for s in plan.stages)
    custom = {3: {"browser": "firefox", "platform": "wasm"}}
    slots = allocate(
        4, model_type="text", model_kind="encoder", installed=lambda b: True, stage_kinds=kinds, custom=custom
    )
    assert [slots[i].specialization for i in range(4)] == ["attention", "feedforward", "attention", "feedforward"]
    assert [slots[i].browser for i in range(4)] == ["firefox", "chromium", "firefox", "firefox"]
    assert slots[3].reason == "custom_browser_allocation"
    assert "guide table: text attention -> firefox" in slots[0].reason
