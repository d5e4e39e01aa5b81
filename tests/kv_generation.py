"""Greedy generation across the shards of a KV-cache plan, in native onnxruntime (test support, not product).

Each shard keeps its own state between calls, as a page will: it starts from empty past tensors
(``StatePair.empty_shape``), and after each call the shard's state outputs replace its state inputs.
Only what ``Stage.carry_names`` names goes from one shard to the next.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from coordinator.model.causal import positions
from coordinator.planning.cuts import Stage
from coordinator.planning.shardset import ShardSet


def _session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@dataclass
class ShardedDecoder:
    """Runs a KV-cache shard set one call at a time; each shard feeds its past from its previous outputs."""

    shards: ShardSet
    batch: int
    sessions: list[ort.InferenceSession] = field(default_factory=list)
    state: list[dict[str, np.ndarray]] = field(default_factory=list)
    calls: int = 0

    def __post_init__(self) -> None:
        self.sessions = [_session(self.shards.path(s.index)) for s in self.shards.plan.stages]
        self.state = [
            {p.input_name: np.zeros(p.empty_shape(self.batch), p.dtype) for p in s.state_pairs}
            for s in self.shards.plan.stages
        ]

    def step(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run every shard once on the new positions in ``feeds``; return what the last shard carries out."""
        env = dict(feeds)
        for stage, session, state in zip(self.shards.plan.stages, self.sessions, self.state, strict=True):
            env = self._run_stage(stage, session, state, env)
        self.calls += 1
        return env

    @staticmethod
    def _run_stage(
        stage: Stage, session: ort.InferenceSession, state: dict[str, np.ndarray], env: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        own = set(stage.state_input_names)
        assert own == set(state), f"stage {stage.index} reads state {sorted(own)}, holds {sorted(state)}"
        feeds = {}
        for name in stage.input_names:
            value = state[name] if name in own else env[name]
            feeds[name] = value.reshape(1) if value.ndim == 0 else value
        outputs = dict(zip(stage.output_names, session.run(list(stage.output_names), feeds), strict=True))
        for pair in stage.state_pairs:
            state[pair.input_name] = outputs.pop(pair.output_name)
        env = {**env, **outputs}
        return {name: env[name] for name in stage.carry_names}


def greedy_generate(
    shards: ShardSet,
    prompt_ids: np.ndarray,
    prompt_mask: np.ndarray,
    max_new_tokens: int,
    eos_token_id: int | None,
    pad_token_id: int = 0,
    logits_name: str = "logits",
) -> np.ndarray:
    """Greedy tokens after a left-padded prompt batch, as transformers' ``generate(do_sample=False)`` returns
    them: a row that produced ``eos_token_id`` gets ``pad_token_id`` afterwards; stop when every row has.

    The prompt runs in one call (prefill), then one call per new token.
    """
    batch = prompt_ids.shape[0]
    decoder = ShardedDecoder(shards, batch)
    mask = prompt_mask.astype(np.int64)
    feeds = {"input_ids": prompt_ids.astype(np.int64), "attention_mask": mask, "position_ids": positions(mask)}
    done = np.zeros(batch, dtype=bool)
    tokens: list[np.ndarray] = []
    for _ in range(max_new_tokens):
        logits = decoder.step(feeds)[logits_name]
        token = np.where(done, pad_token_id, logits[:, -1].argmax(-1)).astype(np.int64)
        tokens.append(token)
        if eos_token_id is not None:
            done |= token == eos_token_id
        if done.all():
            break
        mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
        feeds = {"input_ids": token[:, None], "attention_mask": mask, "position_ids": positions(mask)[:, -1:]}
    assert decoder.calls == len(tokens)
    return np.stack(tokens, axis=1)
