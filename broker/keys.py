"""Every Redis key, stream and consumer-group name xshard uses, in one place.

Key layout (``{ns}`` is the namespace, ``default`` unless configured; tests use one each)::

    xshard:{ns}:workers                    ZSET    worker_id -> last heartbeat (unix ms)
    xshard:{ns}:worker:{worker_id}         HASH    registration (``registry.WorkerInfo``, the only reader
                                                   and writer): browser, platform (as asked),
                                                   execution_provider (as picked), adapter, user_agent,
                                                   host, pid, browser_pid, started_ms, heartbeat_ms,
                                                   state (``WorkerState``), stages (json list of stage
                                                   streams served), capabilities (json: the page's
                                                   webgpu/webnn/wasm probe), platform_note
    xshard:{ns}:control:{worker_id}        STREAM  assignments and commands sent to one worker
    xshard:{ns}:direct:{worker_id}         STREAM  shard jobs routed to one worker (reroute, redistribute,
                                                   change platform); group ``workers``
    xshard:{ns}:stage:{plan_id}:{index}    STREAM  shard jobs of one stage of one plan
                                                   group ``workers``: every worker serving it
    xshard:{ns}:reply:{coordinator_id}     STREAM  results, failures and assignment replies
                                                   for one coordinator; group ``coordinator``
    xshard:{ns}:request:{request_id}       HASH    one request's state: status (pending|done|dead),
                                                   coordinator, plan, the stage-0 job (a DAG plan's
                                                   request: ``dag``, its inputs), per-stage progress
                                                   (``s{i}`` = worker:attempt), the result once done
    xshard:{ns}:inflight:{coordinator_id}  SET     request ids a coordinator has accepted, not finished
    xshard:{ns}:session:{session_id}       HASH    one generation session: plan, prompt and generated
                                                   token ids (json), position; a TTL (``broker.sessions``)
    xshard:{ns}:mirror:{session_id}:{i}    HASH    the copy of stage i's KV cache of one session, written by
                                                   each hand-off of a step (``mirror`` of ``Broker.hand_off``):
                                                   step (the last step it holds), and per cache tensor and
                                                   step the positions it added (``<input>@<step>``: a tensor,
                                                   codec-packed); a TTL each write refreshes
    xshard:{ns}:events                     STREAM  execution and recovery events (history)
    xshard:{ns}:dead                       STREAM  dead-lettered jobs with their reason; group-less
    xshard:{ns}:ack:{token}                STREAM  one-shot answers to one sender (``InjectReply``); the
                                                   sender deletes it once read
    xshard:{ns}:artifact:{sha256}          SET     holder ids that announced the shard file ``{sha256}``
                                                   (``artifacts.ArtifactIndex``; a holder whose key below
                                                   has expired is skipped and removed on lookup)
    xshard:{ns}:holder:{holder_id}         STRING  the base URL of a holder's by-hash file server (a worker
                                                   or a coordinator), with a TTL its announcements refresh

Every stream entry has one field, ``m``: a msgpack-encoded message (see ``codec``).

Connection names (CLIENT SETNAME), so a coordinator sees in CLIENT LIST when a worker's connections close::

    xshard:{ns}:conn:worker:{worker_id}    every connection of one worker process
"""

from __future__ import annotations

PREFIX = "xshard"
DEFAULT_NAMESPACE = "default"

MESSAGE_FIELD = b"m"
STAGE_GROUP = "workers"
REPLY_GROUP = "coordinator"
RECOVERY_CONSUMER = "recovery"  # consumer name a coordinator claims stuck entries into
EVENTS_GROUP = "history"


class Keys:
    """Key names for one namespace."""

    __slots__ = ("ns", "_base")

    def __init__(self, ns: str = DEFAULT_NAMESPACE) -> None:
        if not ns or any(c in ns for c in ": \n"):
            raise ValueError(f"namespace must be non-empty without ':' or spaces, got {ns!r}")
        self.ns = ns
        self._base = f"{PREFIX}:{ns}"

    @property
    def workers(self) -> str:
        return f"{self._base}:workers"

    def worker(self, worker_id: str) -> str:
        return f"{self._base}:worker:{worker_id}"

    def control(self, worker_id: str) -> str:
        return f"{self._base}:control:{worker_id}"

    def direct(self, worker_id: str) -> str:
        return f"{self._base}:direct:{worker_id}"

    def request(self, request_id: str) -> str:
        return f"{self._base}:request:{request_id}"

    def inflight(self, coordinator_id: str) -> str:
        return f"{self._base}:inflight:{coordinator_id}"

    def session(self, session_id: str) -> str:
        return f"{self._base}:session:{session_id}"

    def mirror(self, session_id: str, stage_index: int) -> str:
        return f"{self._base}:mirror:{session_id}:{stage_index}"

    def stage(self, plan_id: str, index: int) -> str:
        return f"{self._base}:stage:{plan_id}:{index}"

    def reply(self, coordinator_id: str) -> str:
        return f"{self._base}:reply:{coordinator_id}"

    @property
    def events(self) -> str:
        return f"{self._base}:events"

    @property
    def dead(self) -> str:
        return f"{self._base}:dead"

    def ack(self, token: str) -> str:
        return f"{self._base}:ack:{token}"

    def artifact(self, sha256: str) -> str:
        return f"{self._base}:artifact:{sha256}"

    def holder(self, holder_id: str) -> str:
        return f"{self._base}:holder:{holder_id}"

    def worker_client(self, worker_id: str) -> str:
        """The connection name of a worker (``worker_client("")`` is the prefix of them all)."""
        return f"{self._base}:conn:worker:{worker_id}"

    @property
    def pattern(self) -> str:
        """Glob matching every key of this namespace."""
        return f"{self._base}:*"
