"""Where the cases run: a Dask cluster (in-process, local processes, an existing
scheduler, or a dask-jobqueue SLURM/PBS cluster), and the one loop that submits
tasks and collects their results.

Nothing here schedules, retries or moves data by itself: tasks go to Dask with
``retries`` and, for the model stages on GPU clusters, ``resources={"GPU": 1}``;
a worker that dies mid-task is restarted by its nanny and the task rescheduled by
the scheduler up to ``allowed_failures`` times, after which the case is
recorded as failed (KilledWorker). Finished cases are on disk already, so a
lost worker loses only the case it was running.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import time

log = logging.getLogger(__name__)


class SchedulerUnreachable(RuntimeError):
    pass


class Executor:
    """A Dask client for the duration of a run (use as a context manager).

    ``workers <= 1`` and no scheduler: an in-process cluster (threads, nothing
    spawned; what headless Slicer uses). ``workers >= 2``: a LocalCluster of
    worker processes with ``memory_limit`` each. ``scheduler``: the address of a
    running scheduler (``tcp://host:8786``). ``jobqueue``: ``"slurm"`` or
    ``"pbs"`` -- a dask-jobqueue cluster configured by Dask's configuration
    (``~/.config/dask/jobqueue.yaml``; docs/cohort.md) scaled to ``jobs`` jobs.
    """

    def __init__(self, workers: int = 1, threads_per_worker: int = 1, memory_limit: str = "6GB",
                 scheduler: str | None = None, allowed_failures: int = 2, jobqueue: str | None = None,
                 jobs: int = 1, gpu_resources: bool = False, progress: bool = True, connect_timeout: str = "15s",
                 processes: bool | None = None, **_ignored):
        self.workers = int(workers)
        self.threads_per_worker = int(threads_per_worker)
        self.memory_limit = memory_limit
        self.scheduler = scheduler
        self.allowed_failures = int(allowed_failures)
        self.jobqueue = jobqueue
        self.jobs = int(jobs)
        self.gpu_resources = bool(gpu_resources)
        self.progress = progress
        self.connect_timeout = connect_timeout
        # worker processes: by default only for 2+ workers (1 worker runs in this process)
        self.processes = self.workers > 1 if processes is None else bool(processes)
        self.client = None
        self._stack = contextlib.ExitStack()

    def describe(self) -> str:
        if self.scheduler:
            return f"Dask scheduler {self.scheduler}"
        if self.jobqueue:
            return f"dask-jobqueue {self.jobqueue} cluster ({self.jobs} jobs)"
        if not self.processes:
            return f"in-process Dask cluster ({self.threads_per_worker} worker thread(s))"
        return f"local Dask cluster ({self.workers} worker processes, {self.memory_limit} each)"

    def __enter__(self):
        import dask
        from distributed import Client, LocalCluster

        # Dask's start-up chatter is not the user's business; warnings and errors still show
        for name in ("distributed", "distributed.scheduler", "distributed.worker", "distributed.core",
                     "distributed.nanny", "distributed.http.proxy"):
            if logging.getLogger(name).level < logging.WARNING:
                logging.getLogger(name).setLevel(logging.WARNING)

        self._stack.enter_context(dask.config.set({
            "distributed.scheduler.allowed-failures": self.allowed_failures,
            # cases are independent and their results small: no work stealing of running model tasks
            "distributed.scheduler.work-stealing": True,
            "distributed.worker.daemon": False,
        }))
        if not self.scheduler and not self.jobqueue:
            # A model stage can hold the GIL for minutes (ITK, ANTs, torch on CPU), which stops
            # the worker's heartbeats; locally, a dead worker process is noticed by its nanny
            # anyway, so heartbeat expiry would only cancel healthy long cases.
            self._stack.enter_context(dask.config.set({"distributed.scheduler.worker-ttl": None}))
        if self.scheduler:
            try:
                self.client = self._stack.enter_context(Client(self.scheduler, timeout=self.connect_timeout))
            except (OSError, TimeoutError) as exc:
                raise SchedulerUnreachable(
                    f"cannot reach the Dask scheduler at {self.scheduler} ({exc}); start it "
                    "(`dask scheduler`) or drop --scheduler to run locally") from None
        elif self.jobqueue:
            import dask_jobqueue
            cls = {"slurm": dask_jobqueue.SLURMCluster, "pbs": dask_jobqueue.PBSCluster}[self.jobqueue]
            cluster = self._stack.enter_context(cls())
            cluster.scale(jobs=self.jobs)
            self.client = self._stack.enter_context(Client(cluster))
        elif not self.processes:
            cluster = self._stack.enter_context(LocalCluster(
                n_workers=1, threads_per_worker=self.threads_per_worker, processes=False,
                dashboard_address=":0", memory_limit=self.memory_limit))
            self.client = self._stack.enter_context(Client(cluster))
        else:
            cluster = self._stack.enter_context(LocalCluster(
                n_workers=max(1, self.workers), threads_per_worker=self.threads_per_worker, processes=True,
                dashboard_address=":0", memory_limit=self.memory_limit))
            self.client = self._stack.enter_context(Client(cluster))
        log.info("executor: %s; dashboard %s", self.describe(), self.client.dashboard_link)
        return self

    def __exit__(self, *exc):
        self.client = None
        return self._stack.__exit__(*exc)

    def map_cases(self, fn, items: list[tuple[str, tuple, dict]], *, label: str, gpu: bool = False,
                  retries: int = 0, on_result=None) -> dict:
        """Run ``fn(*args, **kwargs)`` for each ``(key, args, kwargs)`` on the cluster.

        Returns ``{key: ("ok", result) | ("error", exception)}``. ``on_result(key,
        status, value)`` is called in this process as each task ends (progress, per-case
        scene clean-up in Slicer). ``gpu``: ask for one GPU resource per task (only
        when the workers declare ``--resources GPU=1``).
        """
        from distributed import as_completed

        if not items:
            return {}
        resources = {"GPU": 1} if gpu and self.gpu_resources else None
        futures = {}
        for key, args, kwargs in items:
            future = self.client.submit(fn, *args, **kwargs, key=f"{label}-{key}-{time.time_ns()}", pure=False,
                                        retries=retries, resources=resources)
            futures[future] = key
        results, done = {}, 0
        for future in as_completed(futures):
            key = futures[future]
            if future.status == "finished":
                results[key] = ("ok", future.result())
            else:
                try:
                    results[key] = ("error", future.exception())
                except Exception as exc:  # cancelled futures raise on .exception()
                    results[key] = ("error", exc)
            done += 1
            if self.progress:
                mark = "ok" if results[key][0] == "ok" else "FAILED"
                bar = "#" * int(30 * done / len(items))
                print(f"\r{label:9s} [{bar:<30s}] {done}/{len(items)}  {key}: {mark}   ", end="",
                      file=sys.stderr, flush=True)
            if on_result is not None:
                on_result(key, *results[key])
            future.release()
        if self.progress:
            print(file=sys.stderr)
        return results
