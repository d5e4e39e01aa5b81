"""The manager's arguments, checked before anything starts (no model read, no broker, no browser).

``enable_ipfs``: shard files are content-addressed (sha256), fetched by hash from any holder announced in
Redis and verified (``broker.artifacts``, in the spirit of IPFS). True: the coordinator is a holder of its
shards for workers of other hosts; False: it serves none, so a worker must hold them already (a shared cache
directory, or another worker that fetched them) or its load fails naming the hash.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from coordinator.errors import InputError
from coordinator.planning.precision import AUTO, Precision, check_platform
from coordinator.recovery.ladder import FAULT_TOLERANCE_LEVELS, RECOVERY_STRATEGIES


def check_dtype(dtype: str, platform: str, custom: Mapping[int, Mapping[str, Any]]) -> dict[int, str]:
    """The per-shard dtypes of ``custom``; InputError for an unknown dtype or one its platform cannot run."""
    per_shard = {int(i): str(c["dtype"]).strip().lower() for i, c in custom.items() if "dtype" in c}
    checks = [("", dtype, platform)] + [
        (f"shard {i}: ", per_shard.get(i, dtype), str(c.get("platform", platform))) for i, c in custom.items()
    ]
    for where, wanted, plat in checks:
        if wanted == AUTO:
            continue
        try:
            check_platform(Precision.parse(wanted), plat)
        except InputError as e:
            raise InputError(f"{where}{e}") from None
    return per_shard


def check_arguments(fault_tolerance_level: str, recovery_strategy: str, max_connections: int, ipfs: object) -> None:
    """ValueError for a level, strategy, connection count or ``enable_ipfs`` the manager cannot take."""
    if not isinstance(ipfs, bool):
        raise ValueError(f"enable_ipfs must be True or False, got {ipfs!r}")
    if fault_tolerance_level not in FAULT_TOLERANCE_LEVELS:
        raise ValueError(f"fault_tolerance_level must be one of {FAULT_TOLERANCE_LEVELS}")
    if recovery_strategy not in RECOVERY_STRATEGIES:
        raise ValueError(f"recovery_strategy must be one of {RECOVERY_STRATEGIES}")
    if max_connections < 1:
        raise ValueError(f"max_connections must be >= 1, got {max_connections}")
