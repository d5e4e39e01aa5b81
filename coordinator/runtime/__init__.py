"""The running system: dispatch of jobs and replies, request tracking, liveness, recovery, workers, metrics."""
