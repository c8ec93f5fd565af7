"""Run a reinforcement job: plan (what is left to do), execute on Ray actors, write the manifest.

Why plain actors and not Ray Data: the unit of work is a whole shard (one input shard ->
one output shard of the same name, committed by a marker), models must load once per
actor, and a failed shard must be retried as a unit with a bound. A hand-run pool of
long-lived actors does exactly that with ~100 lines and no hidden buffering; Ray Data's
GPU stages idle between batches without prefetch, its webdataset reader mishandles
out-of-order tar members, and its writers name files by UUID/completion order.
Pixels never pass through the driver: it only sends shard URLs and receives stats.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dr_pipeline.config import ConfigError, EnsembleSpec, JobConfig, redact, to_dict
from dr_pipeline.corpus.readers import PermanentShardError, ShardReadError, expand_urls, shard_name
from dr_pipeline.execute.dataset_dir import DatasetDir
from dr_pipeline.models.teachers import check_ensemble
from dr_pipeline.shards.schema import SCHEMA_VERSION

log = logging.getLogger(__name__)


@dataclass
class Plan:
    dataset: DatasetDir
    config_hash: str
    urls: list[str]              # every input shard
    todo: list[str]              # input shards without a committed output
    skipped: list[str]           # already committed with the same config


@dataclass
class JobReport:
    committed: list[dict] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed


# --------------------------------------------------------------------------- planning

def check_writable(ds: DatasetDir) -> None:
    try:
        ds.ensure()
        ds.write_bytes("_markers/.probe", b"ok")
        ds.fs.rm(ds._p("_markers/.probe"))
    except Exception as e:
        raise ConfigError(f"output location not writable: {ds.root} ({type(e).__name__}: {e}); "
                          "fix permissions/credentials or choose another output.path") from None


def plan_job(job: JobConfig, ensemble: EnsembleSpec, force: bool = False) -> Plan:
    """Validate everything that can be validated without loading a model, then find the work left."""
    check_ensemble(ensemble)
    try:
        urls = expand_urls(job.input.urls, job.input.storage_options)
    except ShardReadError as e:
        raise ConfigError(f"input: {e}") from None
    names = [shard_name(u) for u in urls]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"input: several shards share the name {dup[0]!r}; output shards are named after "
                          "input shards, so input names must be unique")
    ds = DatasetDir(job.output.path, job.output.storage_options)
    config_hash = job.output_hash(ensemble)
    previous = ds.read_json("dataset.json")
    if previous and previous.get("config_hash") != config_hash and not force:
        raise ConfigError(
            f"{ds.root} was made by a different config (hash {previous.get('config_hash')} != {config_hash}); "
            "choose a new output.path, or pass --force to redo it with this config")
    check_writable(ds)
    committed = {n: m for n, m in ds.markers().items() if m.get("config_hash") == config_hash}
    todo = [u for u in urls if shard_name(u) not in committed]
    ds.write_json("dataset.json", {"config_hash": config_hash, "schema_version": SCHEMA_VERSION})
    ds.write_bytes("job.yaml", yaml.safe_dump(redact(to_dict(job)), sort_keys=False).encode())
    ds.write_bytes("ensemble.yaml", yaml.safe_dump(redact(to_dict(ensemble)), sort_keys=False).encode())
    return Plan(ds, config_hash, urls, todo, [u for u in urls if u not in todo])


def write_manifest(plan: Plan, ensemble: EnsembleSpec, report: JobReport) -> dict:
    markers = plan.dataset.markers()
    wanted = {shard_name(u) for u in plan.urls}
    shards = {n: {k: m[k] for k in ("input_url", "data_file", "n_read", "n_written", "n_rejected",
                                    "rejected_by_reason", "bytes", "sha256", "teachers")}
              for n, m in markers.items() if n in wanted and m.get("config_hash") == plan.config_hash}
    manifest = {
        "schema_version": SCHEMA_VERSION, "config_hash": plan.config_hash,
        "teachers": [t.id for t in ensemble.teachers], "captioners": [c.id for c in ensemble.captioners],
        "complete": len(shards) == len(wanted), "n_shards": len(shards), "n_input_shards": len(wanted),
        "n_written": sum(s["n_written"] for s in shards.values()),
        "n_rejected": sum(s["n_rejected"] for s in shards.values()),
        "bytes": sum(s["bytes"] for s in shards.values()),
        "failed": report.failed, "shards": shards,
    }
    plan.dataset.write_json("manifest.json", manifest)
    return manifest


# --------------------------------------------------------------------------- progress

class Progress:
    def __init__(self, total: int, stream=sys.stderr):
        self.total, self.done, self.samples, self.rejected = total, 0, 0, 0
        self.t0 = time.time()
        self.stream = stream

    def update(self, stats: dict) -> None:
        self.done += 1
        self.samples += stats["n_written"]
        self.rejected += stats["n_rejected"]
        dt = max(time.time() - self.t0, 1e-9)
        eta = dt / self.done * (self.total - self.done)
        print(f"[{self.done}/{self.total} shards] {stats['shard']}: {stats['n_written']} written, "
              f"{stats['n_rejected']} rejected | {self.samples / dt:.1f} samples/s | ETA {eta:.0f}s",
              file=self.stream, flush=True)


# --------------------------------------------------------------------------- executors

def _retry_loop(todo: list[str], submit, wait_one, report: JobReport, max_attempts: int, progress: Progress) -> None:
    """Shared bookkeeping: bounded retries per shard; a poison shard is reported, not fatal."""
    pending = deque((u, 1) for u in todo)
    while pending or submit.in_flight():
        while pending and submit.has_capacity():
            submit(*pending.popleft())
        url, attempt, stats, error = wait_one()
        if error is None:
            report.committed.append(stats)
            progress.update(stats)
        elif attempt < max_attempts and not error.startswith(f"{PermanentShardError.__name__}:"):  # retry can't fix it
            log.warning("shard %s failed (attempt %d/%d): %s", url, attempt, max_attempts, error)
            pending.append((url, attempt + 1))
        else:
            report.failed.append({"shard": shard_name(url), "url": url, "error": error, "attempts": attempt})
            print(f"FAILED {shard_name(url)} after {attempt} attempts: {error}", file=sys.stderr, flush=True)


def run_local(plan: Plan, job: JobConfig, ensemble: EnsembleSpec, report: JobReport) -> None:
    """In-process executor (debugging, small jobs): same retries, no Ray."""
    from dr_pipeline.execute.shard_worker import ShardProcessor

    proc = ShardProcessor(job, ensemble)
    queue: deque = deque()

    class Submit:
        def __call__(self, url, attempt):
            queue.append((url, attempt))

        def in_flight(self):
            return bool(queue)

        def has_capacity(self):
            return not queue

    def wait_one():
        url, attempt = queue.popleft()
        try:
            return url, attempt, proc.process(url, plan.dataset, plan.config_hash), None
        except Exception as e:
            return url, attempt, None, f"{type(e).__name__}: {e}"

    _retry_loop(plan.todo, Submit(), wait_one, report, job.execution.max_attempts, Progress(len(plan.todo)))


def _actor_class():
    import ray

    @ray.remote
    class ReinforceActor:
        """Holds the models (loaded once); reinforces whole shards."""

        def __init__(self, job: JobConfig, ensemble: EnsembleSpec, threads: int):
            import torch

            from dr_pipeline.execute.shard_worker import ShardProcessor
            torch.set_num_threads(threads)   # Ray sets OMP threads from num_cpus; be explicit
            self.proc = ShardProcessor(job, ensemble)
            self.dataset = DatasetDir(job.output.path, job.output.storage_options)

        def process(self, url: str, config_hash: str) -> dict:
            return self.proc.process(url, self.dataset, config_hash)

        def pid(self) -> int:
            return os.getpid()

    return ReinforceActor


def pool_size(ex, n_todo: int, resources: dict) -> int:
    fits = [ex.max_actors, n_todo]
    if ex.cpus_per_actor > 0:
        fits.append(int(resources.get("CPU", 0) // ex.cpus_per_actor))
    if ex.gpus_per_actor > 0:
        fits.append(int(resources.get("GPU", 0) // ex.gpus_per_actor))
    return max(min(fits), min(ex.min_actors, n_todo), 1)


def run_ray(plan: Plan, job: JobConfig, ensemble: EnsembleSpec, report: JobReport) -> None:
    import ray

    ex = job.execution
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=ex.address, num_cpus=ex.num_cpus if ex.address is None else None,
                 include_dashboard=False, logging_level="WARNING", log_to_driver=True)
    try:
        Actor = _actor_class()
        n = pool_size(ex, len(plan.todo), ray.cluster_resources())
        threads = max(1, int(ex.cpus_per_actor))

        def make():
            return Actor.options(num_cpus=ex.cpus_per_actor, num_gpus=ex.gpus_per_actor,
                                 max_concurrency=1).remote(job, ensemble, threads)

        idle = [make() for _ in range(n)]
        in_flight: dict = {}
        print(f"reinforcing {len(plan.todo)} shards on {n} actor(s) "
              f"({len(plan.skipped)} already committed)", file=sys.stderr, flush=True)

        class Submit:
            def __call__(self, url, attempt):
                actor = idle.pop()
                in_flight[actor.process.remote(url, plan.config_hash)] = (actor, url, attempt)

            def in_flight(self):
                return bool(in_flight)

            def has_capacity(self):
                return bool(idle)

        def wait_one():
            [ref], _ = ray.wait(list(in_flight), num_returns=1)
            actor, url, attempt = in_flight.pop(ref)
            try:
                stats = ray.get(ref)
                idle.append(actor)
                return url, attempt, stats, None
            except ray.exceptions.RayActorError as e:   # the actor died (OOM, SIGKILL, node lost): replace it
                ray.kill(actor, no_restart=True)
                idle.append(make())
                return url, attempt, None, f"actor died: {type(e).__name__}"
            except ray.exceptions.RayTaskError as e:
                idle.append(actor)
                cause = e.cause if getattr(e, "cause", None) is not None else e
                return url, attempt, None, f"{type(cause).__name__}: {cause}"

        _retry_loop(plan.todo, Submit(), wait_one, report, ex.max_attempts, Progress(len(plan.todo)))
        for a in idle:
            ray.kill(a, no_restart=True)
    finally:
        if started_here:
            ray.shutdown()


def run_job(job: JobConfig, ensemble: EnsembleSpec, force: bool = False, executor: str = "ray") -> JobReport:
    t0 = time.time()
    plan = plan_job(job, ensemble, force)
    report = JobReport(skipped=[shard_name(u) for u in plan.skipped])
    if plan.todo:
        (run_ray if executor == "ray" else run_local)(plan, job, ensemble, report)
    report.seconds = time.time() - t0
    manifest = write_manifest(plan, ensemble, report)
    print(f"done: {manifest['n_shards']}/{manifest['n_input_shards']} shards committed, "
          f"{manifest['n_written']} samples written, {manifest['n_rejected']} rejected, "
          f"{len(report.failed)} shard(s) failed, {report.seconds:.1f}s -> {plan.dataset.root}",
          file=sys.stderr, flush=True)
    return report


def resolve_ensemble(job: JobConfig) -> EnsembleSpec:
    from dr_pipeline.config import load_ensemble

    path = job.ensemble_path()
    if not Path(path).is_file():
        raise ConfigError(f"teachers file not found: {path} (set 'teachers:' to a file in teachers/)")
    return load_ensemble(path)


__all__ = ["plan_job", "run_job", "JobReport", "Plan", "resolve_ensemble"]
