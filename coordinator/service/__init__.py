"""The front door: inference jobs through arq, coordinator services that run them, an operator's view.

settings.py    ServiceSettings: arq's job timeout, tries, leases; the pool's bound (how timeouts nest)
spec.py        InferenceSpec, the payload of an inference job; ManagerKey, what a warm manager is kept for
serializer.py  arq's job_serializer/job_deserializer: msgpack through broker.codec, never pickle
queue.py       arq's keys for one namespace: the queue, jobs, results, coordinators' health
pool.py        ManagerPool: warm ModelShardingManagers, bounded, least recently used closed first
orphans.py     requests left behind by a coordinator service that died
service.py     CoordinatorService: what one ``xshard coordinator`` process holds; the job's body
jobs.py        the arq job function and worker options (WorkerSettings)
client.py      enqueue_inference, fetch_result, wait_result
status.py      the fleet status: workers, stages, requests, dead letters, queue, coordinators
metrics.py     Prometheus metrics of one coordinator
http.py        the coordinator's status page, /status.json, /metrics, /report
"""

from coordinator.service.client import JobView, enqueue_inference, fetch_result, wait_result
from coordinator.service.errors import DeadLettered, JobFailed, JobNotFound, JobRefused, NoWorkers
from coordinator.service.queue import open_queue

__all__ = [
    "DeadLettered",
    "JobFailed",
    "JobNotFound",
    "JobRefused",
    "JobView",
    "NoWorkers",
    "enqueue_inference",
    "fetch_result",
    "open_queue",
    "wait_result",
]
