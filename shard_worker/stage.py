"""A stage this worker serves: which shard, what it feeds and forwards, and where it runs."""

from __future__ import annotations

from dataclasses import dataclass

from broker.kinds import Platform


@dataclass(frozen=True, slots=True)
class Stage:
    """One assigned shard: its stage stream, its file, its inputs and carried outputs, its platform."""

    stream: str
    shard_index: int
    onnx_sha256: str
    input_names: tuple[str, ...]
    carry_names: tuple[str, ...]
    platform: Platform  # as assigned (``auto`` resolved to the worker's own platform)
    model_name: str
    shard_type: str
    provider: str = ""  # what the page picked for ``platform``
    kind: str = ""  # what the shard holds ("attention", "vision", ...), as assigned
    dtype: str = ""  # the shard file's precision, as assigned
    providers: tuple[str, ...] = ()  # the execution providers that may run it (empty: any)

    def session_key(self, platform: str) -> str:
        """The page's session name for this stage on ``platform`` (a stage may run on several)."""
        return f"{self.stream}|{platform}"

    def provider_for(self, platform: str) -> str:
        """The execution provider a run on ``platform`` used: the page's pick for the assigned platform."""
        return self.provider if platform == self.platform else platform
