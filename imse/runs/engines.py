"""Where a reproduction's jobs run: in this process, one after another, or as tasks on a Ray cluster.

Both yield ``(job, result)`` as each job finishes, so the caller can save every result at once (and resume after
an interruption) whichever engine ran it. Ray is an optional extra (``pip install "imse-lab[ray]"``): each job is
a task that asks for one GPU when the runs use CUDA, so a cluster runs as many at once as it has GPUs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

__all__ = ["ENGINES", "run_in_process", "run_on_ray"]

ENGINES = ("local", "ray")


def run_in_process(jobs: Sequence[Any], run_job: Callable[..., dict], kwargs: Callable[[Any], dict]) -> Iterator:
    for job in jobs:
        yield job, run_job(job, **kwargs(job))


def run_on_ray(
    jobs: Sequence[Any],
    run_job: Callable[..., dict],
    kwargs: Callable[[Any], dict],
    *,
    address: str | None = None,
    gpus_per_job: float = 0.0,
) -> Iterator:
    """Submit every job as a Ray task (``address``: an existing cluster, else a local one) and yield them in the
    order they finish. ``run_job`` must be importable by the workers (a module-level function)."""
    try:
        import ray
    except ImportError as error:
        raise RuntimeError('the Ray engine needs Ray: pip install "imse-lab[ray]"') from error
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    try:
        task = ray.remote(num_cpus=1, num_gpus=gpus_per_job)(run_job)
        pending = {task.remote(job, **kwargs(job)): job for job in jobs}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            job = pending.pop(ready[0])
            yield job, ray.get(ready[0])
    finally:
        if started_here:
            ray.shutdown()
