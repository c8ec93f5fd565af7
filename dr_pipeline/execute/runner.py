"""Run a reinforcement job: plan (what is left to do), execute on Ray actors, write the manifest.

Why plain actors and not Ray Data: the unit of work is a whole shard (one input shard ->
one output shard of the same name, committed by a marker), models must load once per
actor, and a failed shard must be retried as a unit with a bound. A hand-run pool of
long-lived actors does exactly that in ~150 lines with no hidden buffering; Ray Data's
GPU stages idle between batches without prefetch, its webdataset reader mishandles
out-of-order tar members, and its writers name files by UUID/completion order.
Pixels never pass through the driver: it only sends shard URLs and receives stats.

Failure model (docs/cluster.md):
- a storage call that fails transiently is retried in place with backoff + jitter (retry.py);
- a shard attempt that fails (its actor died, or an error) is retried as a whole, up to
  ``execution.max_attempts`` attempts; permanent errors (403/404, not a shard) get one;
- a shard that still fails is reported (shard, error, attempts) and the rest go on;
- the pool asks for up to ``max_actors`` actors, works with those Ray can place, replaces
  dead ones, and fails the job only if it stays below ``min_actors`` for
  ``actor_start_timeout_s``;
- rerunning the same job resumes: committed shards (marker + data file of the marker's
  size, same config hash) are skipped.
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

from dr_pipeline.config import ConfigError, EnsembleSpec, ExecutionSpec, JobConfig, redact, to_dict
from dr_pipeline.corpus.readers import ShardReadError, expand_urls, shard_name
from dr_pipeline.execute.dataset_dir import DatasetDir
from dr_pipeline.execute.retry import RetryPolicy, describe, is_permanent, redact_url, retry_call
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
    failed: list[dict] = field(default_factory=list)     # {shard, url, error, attempts, permanent}
    retried: list[dict] = field(default_factory=list)    # {shard, attempt, error}: attempts that failed and were retried
    error: str | None = None                             # the job stopped early (no actor could be placed, ...)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed and self.error is None


class PoolError(RuntimeError):
    """The actor pool cannot do the work (actors cannot be placed or keep failing to start)."""


def retry_policy(ex: ExecutionSpec) -> RetryPolicy:
    return RetryPolicy(attempts=ex.io_attempts, base_s=ex.io_backoff_s)


def output_dir(job: JobConfig) -> DatasetDir:
    return DatasetDir(job.output.path, job.output.storage_options, retry_policy(job.execution))


# --------------------------------------------------------------------------- planning

def check_writable(ds: DatasetDir) -> None:
    try:
        ds.ensure()
        ds.write_bytes("_markers/.probe", b"ok")
        ds.remove("_markers/.probe")
    except Exception as e:
        raise ConfigError(f"output location not writable: {redact_url(ds.root)} ({describe(e)}); "
                          "fix permissions/credentials or choose another output.path") from None


def plan_job(job: JobConfig, ensemble: EnsembleSpec, force: bool = False) -> Plan:
    """Validate everything that can be validated without loading a model, then find the work left."""
    check_ensemble(ensemble)
    policy = retry_policy(job.execution)
    try:
        urls = retry_call(lambda: expand_urls(job.input.urls, job.input.storage_options), "list input", policy)
    except Exception as e:
        if isinstance(e, ShardReadError) or is_permanent(e):
            raise ConfigError(f"input: {e}") from None
        raise
    names = [shard_name(u) for u in urls]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"input: several shards share the name {dup[0]!r}; output shards are named after "
                          "input shards, so input names must be unique")
    ds = output_dir(job)
    config_hash = job.output_hash(ensemble)
    markers = ds.markers()
    previous = ds.read_json("dataset.json")
    hashes = {m.get("config_hash") for m in markers.values()} | ({previous.get("config_hash")} if previous else set())
    other = sorted(h for h in hashes if h != config_hash)
    if other and not force:
        raise ConfigError(
            f"{redact_url(ds.root)} was made by a different config (hash {other[0]} != {config_hash}); "
            "choose a new output.path, or pass --force to redo it with this config")
    check_writable(ds)
    sizes = ds.data_sizes()
    committed = set()
    for n, m in markers.items():
        if m.get("config_hash") == config_hash and sizes.get(n) == m.get("bytes"):
            committed.add(n)
        else:   # another config (--force), or its data file is missing / replaced: redo it, unseen meanwhile
            ds.uncommit(n)
    removed = ds.clean_tmp()
    if removed:
        log.info("removed %d temporary file(s) left by killed writers", removed)
    todo = [u for u in urls if shard_name(u) not in committed]
    ds.write_json("dataset.json", {"config_hash": config_hash, "schema_version": SCHEMA_VERSION})
    ds.write_bytes("job.yaml", yaml.safe_dump(redact(to_dict(job)), sort_keys=False).encode())
    ds.write_bytes("ensemble.yaml", yaml.safe_dump(redact(to_dict(ensemble)), sort_keys=False).encode())
    return Plan(ds, config_hash, urls, todo, [u for u in urls if u not in todo])


MANIFEST_SHARD_KEYS = ("input_url", "data_file", "n_read", "n_written", "n_rejected", "rejected_by_reason",
                       "bytes", "sha256", "teachers")


def write_manifest(plan: Plan, ensemble: EnsembleSpec, report: JobReport) -> dict:
    """Every committed shard of this config (this run's and earlier runs'), written last."""
    markers = plan.dataset.markers()
    wanted = {shard_name(u) for u in plan.urls}
    shards = {n: {k: m[k] for k in MANIFEST_SHARD_KEYS}
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
    def __init__(self, total: int, stream=None):
        self.total, self.done, self.samples, self.rejected = total, 0, 0, 0
        self.t0 = time.time()
        self.stream = stream

    @property
    def out(self):
        return self.stream or sys.stderr     # looked up per line: sys.stderr may be redirected later

    def update(self, stats: dict) -> None:
        self.done += 1
        self.samples += stats["n_written"]
        self.rejected += stats["n_rejected"]
        dt = max(time.time() - self.t0, 1e-9)
        eta = dt / self.done * (self.total - self.done)
        print(f"[{self.done}/{self.total} shards] {stats['shard']}: {stats['n_written']} written, "
              f"{stats['n_rejected']} rejected | {self.samples / dt:.1f} samples/s | "
              f"{self.rejected} rejected in all | ETA {eta:.0f}s", file=self.out, flush=True)

    def note(self, msg: str) -> None:
        print(msg, file=self.out, flush=True)


# --------------------------------------------------------------------------- executors

@dataclass
class Outcome:
    """How one shard attempt ended."""
    url: str
    attempt: int
    stats: dict | None = None
    error: str | None = None
    permanent: bool = False


def _retry_loop(todo: list[str], pool, report: JobReport, max_attempts: int, progress: Progress) -> None:
    """Shared bookkeeping: bounded retries per shard; a poison shard is reported, not fatal.

    ``pool`` has ``has_capacity()``, ``busy()``, ``submit(url, attempt)`` and ``wait()``, which
    returns the next ``Outcome`` (or None when only the pool itself changed)."""
    pending = deque((u, 1) for u in todo)
    while pending or pool.busy():
        while pending and pool.has_capacity():
            pool.submit(*pending.popleft())
        out = pool.wait()
        if out is None:
            continue
        name = shard_name(out.url)
        if out.error is None:
            report.committed.append(out.stats)
            progress.update(out.stats)
        elif out.attempt < max_attempts and not out.permanent:
            report.retried.append({"shard": name, "attempt": out.attempt, "error": out.error})
            progress.note(f"retrying {name} (attempt {out.attempt}/{max_attempts} failed: {out.error})")
            pending.append((out.url, out.attempt + 1))
        else:
            report.failed.append({"shard": name, "url": redact_url(out.url), "error": out.error,
                                  "attempts": out.attempt, "permanent": out.permanent})
            why = "permanent error, not retried" if out.permanent else f"after {out.attempt} attempts"
            progress.note(f"FAILED {name} ({why}): {out.error}")


def _error_outcome(url: str, attempt: int, e: BaseException) -> Outcome:
    return Outcome(url, attempt, error=describe(e), permanent=is_permanent(e))


class LocalPool:
    """In-process executor (debugging, small jobs): same retries, no Ray."""

    def __init__(self, plan: Plan, job: JobConfig, ensemble: EnsembleSpec):
        from dr_pipeline.execute.shard_worker import ShardProcessor

        self.plan = plan
        self.proc = ShardProcessor(job, ensemble)
        self.queue: deque = deque()

    def submit(self, url: str, attempt: int) -> None:
        self.queue.append((url, attempt))

    def busy(self) -> bool:
        return bool(self.queue)

    def has_capacity(self) -> bool:
        return not self.queue

    def wait(self) -> Outcome:
        url, attempt = self.queue.popleft()
        try:
            return Outcome(url, attempt, self.proc.process(url, self.plan.dataset, self.plan.config_hash))
        except Exception as e:
            return _error_outcome(url, attempt, e)


def run_local(plan: Plan, job: JobConfig, ensemble: EnsembleSpec, report: JobReport) -> None:
    _retry_loop(plan.todo, LocalPool(plan, job, ensemble), report, job.execution.max_attempts,
                Progress(len(plan.todo)))


def _actor_class():
    import ray

    @ray.remote(max_restarts=0)
    class ReinforceActor:
        """Holds the models (loaded once); reinforces whole shards."""

        def __init__(self, job: JobConfig, ensemble: EnsembleSpec, threads: int):
            import torch

            from dr_pipeline.execute.shard_worker import ShardProcessor
            torch.set_num_threads(threads)   # Ray sets OMP threads from num_cpus; be explicit
            self.proc = ShardProcessor(job, ensemble)
            self.dataset = output_dir(job)

        def process(self, url: str, config_hash: str) -> dict:
            return self.proc.process(url, self.dataset, config_hash)

        def pid(self) -> int:
            return os.getpid()

    return ReinforceActor


class RayActorPool:
    """Long-lived model actors, elastic between ``min_actors`` and ``max_actors``.

    All actors are asked for at once; each becomes usable when its models are loaded (its
    ``pid()`` call returns), so actors Ray cannot place yet (busy cluster, autoscaler still
    adding GPU nodes) never hold work: shards only go to ready actors. A dead actor is
    replaced and its shard comes back as a failed attempt. The pool fails only when it has
    had fewer than ``min_actors`` ready actors for ``actor_start_timeout_s``, or when actors
    keep failing to start before any became ready.
    """

    def __init__(self, plan: Plan, job: JobConfig, ensemble: EnsembleSpec, progress: Progress):
        import ray

        self.ray, self.plan, self.progress = ray, plan, progress
        self.ex = ex = job.execution
        Actor = _actor_class()
        threads = max(1, int(ex.cpus_per_actor))
        self._new = lambda: Actor.options(num_cpus=ex.cpus_per_actor, num_gpus=ex.gpus_per_actor,
                                          max_concurrency=1).remote(job, ensemble, threads)
        self.target = max(1, min(ex.max_actors, len(plan.todo)))
        self.need = max(1, min(ex.min_actors, len(plan.todo)))
        self.starting: dict = {}          # pid() ref -> actor not ready yet
        self.idle: list = []
        self.running: dict = {}           # process() ref -> (actor, url, attempt)
        self.start_failures, self.ever_ready = 0, 0
        self.short_since: float | None = time.monotonic()
        for _ in range(self.target):
            self._spawn()

    # -------------------------------------------------------------- bookkeeping
    def _spawn(self) -> None:
        actor = self._new()
        self.starting[actor.pid.remote()] = actor

    def _kill(self, actor) -> None:
        try:
            self.ray.kill(actor, no_restart=True)
        except Exception:
            pass

    def n_ready(self) -> int:
        return len(self.idle) + len(self.running)

    def _track_capacity(self) -> None:
        if self.n_ready() >= self.need:
            self.short_since = None
        elif self.short_since is None:
            self.short_since = time.monotonic()

    def _timeout(self) -> float | None:
        if self.short_since is None:
            return None
        return max(0.0, self.short_since + self.ex.actor_start_timeout_s - time.monotonic())

    def _placement_error(self) -> PoolError:
        ray = self.ray
        total, free = ray.cluster_resources(), ray.available_resources()
        have = ", ".join(f"{k} {free.get(k, 0):g} free of {total.get(k, 0):g}" for k in ("CPU", "GPU"))
        return PoolError(
            f"only {self.n_ready()} of min_actors={self.need} actor(s) ready after "
            f"{self.ex.actor_start_timeout_s:g}s; each asks for {self.ex.cpus_per_actor:g} CPU and "
            f"{self.ex.gpus_per_actor:g} GPU, the cluster has {have}. Add nodes, lower "
            "execution.cpus_per_actor / gpus_per_actor / min_actors, or raise execution.actor_start_timeout_s; "
            "rerun the same command to resume")

    # -------------------------------------------------------------- pool interface
    def has_capacity(self) -> bool:
        return bool(self.idle)

    def busy(self) -> bool:
        return bool(self.running)

    def submit(self, url: str, attempt: int) -> None:
        actor = self.idle.pop()
        self.running[actor.process.remote(url, self.plan.config_hash)] = (actor, url, attempt)

    def wait(self) -> Outcome | None:
        ray = self.ray
        refs = [*self.running, *self.starting]
        if not refs:
            raise PoolError("no actor is alive or starting")
        if self._timeout() == 0.0:
            raise self._placement_error()
        done, _ = ray.wait(refs, num_returns=1, timeout=self._timeout())
        if not done:
            raise self._placement_error()
        ref = done[0]
        if ref in self.starting:
            self._started(ref)
            return None
        actor, url, attempt = self.running.pop(ref)
        try:
            stats = ray.get(ref)
        except ray.exceptions.RayActorError as e:   # the actor died (OOM, SIGKILL, node lost): replace it
            self._kill(actor)
            self._spawn()
            self._track_capacity()
            return Outcome(url, attempt, error=f"actor died: {_first_line(e)}")
        except ray.exceptions.RayTaskError as e:      # the shard's code raised: the actor is fine
            self.idle.append(actor)
            cause = e.cause if getattr(e, "cause", None) is not None else e
            return _error_outcome(url, attempt, cause)
        except ray.exceptions.RayError as e:          # anything else from Ray: do not trust the actor
            self._kill(actor)
            self._spawn()
            self._track_capacity()
            return Outcome(url, attempt, error=f"ray error: {_first_line(e)}")
        self.idle.append(actor)
        return Outcome(url, attempt, stats)

    def _started(self, ref) -> None:
        actor = self.starting.pop(ref)
        try:
            pid = self.ray.get(ref)
        except self.ray.exceptions.RayError as e:    # died while loading models
            self._kill(actor)
            self.start_failures += 1
            if not self.ever_ready and self.start_failures >= self.ex.max_attempts:
                raise PoolError(f"actors fail to start ({self.start_failures} tries): {_last_line(e)}") from None
            if self.start_failures <= self.ex.max_attempts * self.target:
                self._spawn()
            return
        self.ever_ready += 1
        self.idle.append(actor)
        self._track_capacity()
        self.progress.note(f"actor ready (pid {pid}); {self.n_ready()} ready, {len(self.starting)} starting")

    def shutdown(self) -> None:
        for a in [*self.idle, *(a for a, _, _ in self.running.values()), *self.starting.values()]:
            self._kill(a)
        self.idle, self.running, self.starting = [], {}, {}


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: " + (str(e).strip().splitlines() or [""])[0][:300]


def _last_line(e: BaseException) -> str:
    lines = [s for s in str(e).strip().splitlines() if s.strip()]
    return f"{type(e).__name__}: " + (lines[-1].strip()[:500] if lines else "")


def ray_address(ex: ExecutionSpec) -> str:
    """Where to run: the job's address; else $RAY_ADDRESS (set by `ray job submit`); else a new
    local instance. Never Ray's implicit "latest cluster on this machine" (/tmp/ray/ray_current_cluster):
    a laptop job must not land on whatever cluster another process happens to have started."""
    return ex.address or os.environ.get("RAY_ADDRESS") or "local"


def run_ray(plan: Plan, job: JobConfig, ensemble: EnsembleSpec, report: JobReport) -> None:
    import ray

    ex = job.execution
    started_here = not ray.is_initialized()
    if started_here:
        address = ray_address(ex)
        local = address == "local"
        try:
            ray.init(address=address, num_cpus=ex.num_cpus if local else None,
                     num_gpus=ex.num_gpus if local else None,
                     include_dashboard=False, logging_level="WARNING", log_to_driver=True)
        except ConnectionError as e:
            raise ConfigError(f"no Ray cluster at address {address!r} ({e}); start one (`ray start --head`), "
                              "fix execution.address / --address, or leave both unset for a local Ray") from None
    pool = None
    try:
        progress = Progress(len(plan.todo))
        pool = RayActorPool(plan, job, ensemble, progress)
        progress.note(f"reinforcing {len(plan.todo)} shards on up to {pool.target} actor(s) "
                      f"({ex.cpus_per_actor:g} CPU, {ex.gpus_per_actor:g} GPU each; "
                      f"{len(plan.skipped)} shard(s) already committed)")
        _retry_loop(plan.todo, pool, report, ex.max_attempts, progress)
    except PoolError as e:
        report.error = str(e)
    finally:
        if pool is not None:
            pool.shutdown()
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
          f"{len(report.failed)} shard(s) failed, {len(report.retried)} attempt(s) retried, "
          f"{report.seconds:.1f}s -> {redact_url(plan.dataset.root)}", file=sys.stderr, flush=True)
    if report.error:
        print(f"job stopped: {report.error}", file=sys.stderr, flush=True)
    return report


def resolve_ensemble(job: JobConfig) -> EnsembleSpec:
    from dr_pipeline.config import load_ensemble

    path = job.ensemble_path()
    if not Path(path).is_file():
        raise ConfigError(f"teachers file not found: {path} (set 'teachers:' to a file in teachers/)")
    return load_ensemble(path)


__all__ = ["JobReport", "Plan", "PoolError", "plan_job", "ray_address", "resolve_ensemble", "run_job"]
