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
import statistics
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from dr_pipeline.config import ConfigError, EnsembleSpec, ExecutionSpec, JobConfig
from dr_pipeline.corpus.readers import ShardReadError, expand_urls, shard_name
from dr_pipeline.execute.progress import Progress
from dr_pipeline.shards.dataset import FailedShard, Manifest, ReinforcedDataset, ShardStats
from dr_pipeline.storage.retry import RetryPolicy, describe, is_permanent, redact_url, retry_call

log = logging.getLogger(__name__)


@dataclass
class JobPlan:
    dataset: ReinforcedDataset
    config_hash: str
    urls: list[str]  # every input shard
    todo: list[str]  # input shards without a committed output
    skipped: list[str]  # already committed with the same config
    manifest: Manifest  # committed shards so far; the driver adds to it as shards commit
    markers_read: int = 0  # marker bodies planning had to read


@dataclass
class JobReport:
    committed: list[str] = field(default_factory=list)  # shards committed by this run
    skipped: list[str] = field(default_factory=list)
    failed: list[FailedShard] = field(default_factory=list)
    retried: list[dict] = field(default_factory=list)  # {shard, attempt, error}: attempts that failed and were retried
    error: str | None = None  # the job stopped early (no actor could be placed, ...)
    seconds: float = 0.0
    manifest: Manifest | None = None

    @property
    def ok(self) -> bool:
        return not self.failed and self.error is None


class PoolError(RuntimeError):
    """The actor pool cannot do the work (actors cannot be placed or keep failing to start)."""


def retry_policy(ex: ExecutionSpec) -> RetryPolicy:
    return RetryPolicy(attempts=ex.io_attempts, base_s=ex.io_backoff_s)


def output_dataset(job: JobConfig) -> ReinforcedDataset:
    return ReinforcedDataset(job.output.path, job.output.storage_options, retry_policy(job.execution))


# --------------------------------------------------------------------------- planning


def check_writable(ds: ReinforcedDataset) -> None:
    try:
        ds.ensure()
        ds.folder.write_bytes("_markers/.probe", b"ok")
        ds.folder.remove("_markers/.probe")
    except Exception as e:
        raise ConfigError(
            f"output location not writable: {redact_url(ds.root)} ({describe(e)}); "
            "fix permissions/credentials or choose another output.path"
        ) from None


def _different_config(ds: ReinforcedDataset, job: JobConfig, ensemble: EnsembleSpec, old: str, new: str) -> ConfigError:
    keys = ds.changed_keys(job, ensemble)
    what = (
        f"these keys differ: {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
        if keys
        else "the config that made it is not recorded"
    )
    return ConfigError(
        f"{redact_url(ds.root)} was made by a different config (hash {old} != {new}; {what}); "
        "choose a new output.path, or pass --force to redo it with this config"
    )


def plan_job(job: JobConfig, ensemble: EnsembleSpec, force: bool = False) -> JobPlan:
    """Validate everything that can be validated without loading a model, then find the work left.

    O(shards) time; storage calls: one input listing, two output listings, the manifest, the
    marker bodies it does not vouch for (read concurrently), the job record."""
    from dr_pipeline.models.check import check_ensemble_isolated

    check_ensemble_isolated(ensemble)  # in a child process: the driver never imports torch
    policy = retry_policy(job.execution)
    try:
        urls = retry_call(lambda: expand_urls(job.input.urls, job.input.storage_options), "list input", policy)
    except Exception as e:
        if isinstance(e, ShardReadError) or is_permanent(e):
            raise ConfigError(f"input: {e}") from None
        raise
    names = [shard_name(u) for u in urls]
    wanted = set(names)
    if len(wanted) != len(names):
        seen: set[str] = set()
        dup = next(n for n in names if n in seen or seen.add(n))
        raise ConfigError(
            f"input: several shards share the name {dup!r}; output shards are named after "
            "input shards, so input names must be unique"
        )
    ds = output_dataset(job)
    config_hash = job.output_hash(ensemble)
    previous = ds.config_hash()
    if previous not in (None, config_hash) and not force:
        raise _different_config(ds, job, ensemble, previous, config_hash)
    fresh = Manifest(
        config_hash,
        [t.id for t in ensemble.teachers],
        [c.id for c in ensemble.captioners],
        len(urls),
        started_at=round(time.time(), 3),
    )
    state = ds.resume_state(fresh, wanted)
    if state.other_hashes and not force:
        raise _different_config(ds, job, ensemble, sorted(state.other_hashes)[0], config_hash)
    check_writable(ds)
    if previous != config_hash:  # a new config: the old manifest must not vouch for anything any more
        ds.write_manifest(state.manifest)
    ds.folder.remove_many([ds.marker_rel(n) for n in state.stale])  # redo these, unseen meanwhile
    removed = ds.clean_tmp()
    if removed:
        log.info("removed %d temporary file(s) left by killed writers", removed)
    committed = state.manifest.shards
    todo = [u for u, n in zip(urls, names) if n not in committed]
    skipped = [u for u, n in zip(urls, names) if n in committed]
    ds.write_job_record(job, ensemble, config_hash)
    return JobPlan(ds, config_hash, urls, todo, skipped, state.manifest, state.markers_read)


class ManifestCheckpoint:
    """Writes the in-memory manifest every ``every_s`` seconds (at least 20x the last write's time,
    so a 200,000-shard manifest never costs the driver more than ~5 % of its time) and at the end."""

    def __init__(self, plan: JobPlan, every_s: float):
        self.plan, self.every_s = plan, every_s
        self.next_at = time.monotonic() + every_s
        self.writes = 0

    def write(self) -> dict:
        t0 = time.monotonic()
        obj = self.plan.dataset.write_manifest(self.plan.manifest)
        dt = time.monotonic() - t0
        self.writes += 1
        self.next_at = time.monotonic() + max(self.every_s, 20 * dt)
        return obj

    def maybe(self) -> None:
        if time.monotonic() >= self.next_at:
            self.write()


# --------------------------------------------------------------------------- executors


@dataclass
class Outcome:
    """How one shard attempt ended."""

    url: str
    attempt: int
    stats: ShardStats | None = None
    error: str | None = None
    permanent: bool = False


def _retry_loop(plan: JobPlan, pool, report: JobReport, ex: ExecutionSpec, progress: Progress) -> None:
    """Shared bookkeeping: bounded retries per shard; a poison shard is reported, not fatal;
    committed stats go into the in-memory manifest, which is checkpointed periodically.

    ``pool`` has ``has_capacity()``, ``busy()``, ``submit(url, attempt)`` and ``wait()``, which
    returns the next ``Outcome`` (or None when only the pool itself changed). Per outcome the
    work is O(1) whatever the number of shards done."""
    checkpoint = ManifestCheckpoint(plan, ex.manifest_every_s)
    pending = deque((u, 1) for u in plan.todo)
    while pending or pool.busy():
        while pending and pool.has_capacity():
            pool.submit(*pending.popleft())
        out = pool.wait()
        if out is None:
            continue
        name = shard_name(out.url)
        if out.error is None:
            plan.manifest.add(out.stats)
            report.committed.append(name)
            progress.update(out.stats)
        elif out.attempt < ex.max_attempts and not out.permanent:
            report.retried.append({"shard": name, "attempt": out.attempt, "error": out.error})
            progress.note(f"retrying {name} (attempt {out.attempt}/{ex.max_attempts} failed: {out.error})")
            pending.append((out.url, out.attempt + 1))
        else:
            failed = FailedShard(name, redact_url(out.url), out.error, out.attempt, out.permanent)
            report.failed.append(failed)
            plan.manifest.failed.append(failed)
            why = "permanent error, not retried" if out.permanent else f"after {out.attempt} attempts"
            progress.note(f"FAILED {name} ({why}): {out.error}")
        checkpoint.maybe()


def _error_outcome(url: str, attempt: int, e: BaseException) -> Outcome:
    return Outcome(url, attempt, error=describe(e), permanent=is_permanent(e))


class LocalPool:
    """In-process executor (debugging, small jobs): same retries, no Ray."""

    def __init__(self, plan: JobPlan, job: JobConfig, ensemble: EnsembleSpec, processor=None):
        if processor is None:
            from dr_pipeline.execute.shard_worker import ShardProcessor as processor

        self.plan = plan
        self.proc = processor(job, ensemble)
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


def run_local(plan: JobPlan, job: JobConfig, ensemble: EnsembleSpec, report: JobReport, processor=None) -> None:
    progress = Progress(len(plan.todo))
    try:
        _retry_loop(plan, LocalPool(plan, job, ensemble, processor), report, job.execution, progress)
    finally:
        progress.close()


def _actor_class():
    import ray

    @ray.remote(max_restarts=0)
    class ReinforceActor:
        """Holds the models (loaded once); reinforces whole shards."""

        def __init__(self, job: JobConfig, ensemble: EnsembleSpec, threads: int, processor=None):
            t0 = time.perf_counter()
            if processor is None:
                import torch

                from dr_pipeline.execute.shard_worker import ShardProcessor as processor

                torch.set_num_threads(threads)  # Ray sets OMP threads from num_cpus; be explicit
            self.proc = processor(job, ensemble)
            self.dataset = output_dataset(job)
            self.load_s = time.perf_counter() - t0

        def process(self, url: str, config_hash: str) -> ShardStats:
            return self.proc.process(url, self.dataset, config_hash)

        def ready(self) -> ActorInfo:
            from dr_pipeline.memory import peak_rss_bytes

            weights = self.proc.weight_bytes() if hasattr(self.proc, "weight_bytes") else 0
            return ActorInfo(os.getpid(), round(self.load_s, 2), peak_rss_bytes(), weights)

    return ReinforceActor


@dataclass
class ActorInfo:
    """What a ready actor reports: the start-up and memory figures docs/cluster.md tabulates."""

    pid: int
    load_s: float  # imports + model load inside the actor
    peak_rss: int  # bytes, after loading
    weight_bytes: int  # the models' parameters and buffers

    def line(self) -> str:
        mem = f", peak RSS {self.peak_rss / 2**30:.2f} GiB" + (
            f" for {self.weight_bytes / 2**30:.2f} GiB of weights" if self.weight_bytes else ""
        )
        return f"pid {self.pid}, models loaded in {self.load_s:.1f}s{mem}"


class ShardDeadline:
    """When a running shard attempt counts as hung: ``shard_timeout_s`` if set, else
    max(``shard_timeout_min_s``, 10 x the median time of the last 99 shards), and none before 3
    shards finished (the first shards carry warm-up)."""

    def __init__(self, ex: ExecutionSpec):
        self.ex = ex
        self.recent: deque[float] = deque(maxlen=99)
        self.limit: float | None = ex.shard_timeout_s or None

    def observe(self, seconds: float) -> None:
        self.recent.append(seconds)
        if not self.ex.shard_timeout_s and len(self.recent) >= 3 and len(self.recent) % 3 == 0:
            self.limit = max(self.ex.shard_timeout_min_s, 10 * statistics.median(self.recent))


class RayActorPool:
    """Long-lived model actors, elastic between ``min_actors`` and ``max_actors``.

    All actors are asked for at once; each becomes usable when its models are loaded (its
    ``ready()`` call returns), so actors Ray cannot place yet (busy cluster, autoscaler still
    adding GPU nodes) never hold work: shards only go to ready actors. A dead actor is
    replaced and its shard comes back as a failed attempt. The pool fails only when it has
    had fewer than ``min_actors`` ready actors for ``actor_start_timeout_s``, or when actors
    keep failing to start before any became ready. A shard attempt past its ``ShardDeadline``
    (a stuck read, a deadlock, a wedged GPU, a SIGSTOPped process) is failed, its actor killed
    and replaced, and the shard retried like any failed attempt.

    ``processor`` replaces ``ShardProcessor`` (a class with the same ``__init__(job, ensemble)``
    and ``process(url, dataset, config_hash)``): the driver-at-scale benchmark uses a stand-in.
    """

    def __init__(self, plan: JobPlan, job: JobConfig, ensemble: EnsembleSpec, progress: Progress, processor=None):
        import ray

        self.ray, self.plan, self.progress = ray, plan, progress
        self.ex = ex = job.execution
        Actor = _actor_class()
        threads = max(1, int(ex.cpus_per_actor))
        self._new = lambda: Actor.options(
            num_cpus=ex.cpus_per_actor, num_gpus=ex.gpus_per_actor, max_concurrency=1
        ).remote(job, ensemble, threads, processor)
        self.deadline = ShardDeadline(ex)
        self.target = max(1, min(ex.max_actors, len(plan.todo)))
        self.need = max(1, min(ex.min_actors, len(plan.todo)))
        self.starting: dict = {}  # ready() ref -> actor not ready yet
        self.idle: list = []
        self.running: dict = {}  # process() ref -> (actor, url, attempt, started monotonic)
        self.start_failures, self.ever_ready = 0, 0
        self.actor_infos: list[ActorInfo] = []
        self.short_since: float | None = time.monotonic()
        for _ in range(self.target):
            self._spawn()

    # -------------------------------------------------------------- bookkeeping
    def _spawn(self) -> None:
        actor = self._new()
        self.starting[actor.ready.remote()] = actor

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
            "rerun the same command to resume"
        )

    # -------------------------------------------------------------- pool interface
    def has_capacity(self) -> bool:
        return bool(self.idle)

    def busy(self) -> bool:
        return bool(self.running)

    def submit(self, url: str, attempt: int) -> None:
        actor = self.idle.pop()
        ref = actor.process.remote(url, self.plan.config_hash)
        self.running[ref] = (actor, url, attempt, time.monotonic())

    def _replace(self, actor) -> None:
        self._kill(actor)
        self._spawn()
        self._track_capacity()

    def _hung(self) -> tuple[object, float] | None:
        """The running attempt past its deadline (the oldest), with its age; None if there is none."""
        if self.deadline.limit is None or not self.running:
            return None
        ref, (_, _, _, t0) = min(self.running.items(), key=lambda kv: kv[1][3])
        age = time.monotonic() - t0
        return (ref, age) if age >= self.deadline.limit else None

    def _wait_timeout(self) -> float | None:
        waits = [t for t in (self._timeout(),) if t is not None]
        if self.deadline.limit is not None and self.running:
            oldest = min(t0 for *_, t0 in self.running.values())
            waits.append(max(0.0, oldest + self.deadline.limit - time.monotonic()))
        return min(waits) if waits else None

    def wait(self) -> Outcome | None:
        ray = self.ray
        refs = [*self.running, *self.starting]
        if not refs:
            raise PoolError("no actor is alive or starting")
        if self._timeout() == 0.0:
            raise self._placement_error()
        done, _ = ray.wait(refs, num_returns=1, timeout=self._wait_timeout())
        if not done:
            hung = self._hung()
            if hung is None:
                if self._timeout() == 0.0:
                    raise self._placement_error()
                return None
            ref, age = hung
            actor, url, attempt, _ = self.running.pop(ref)
            self._replace(actor)
            return Outcome(
                url,
                attempt,
                error=f"hung: no result after {age:.0f}s (deadline "
                f"{self.deadline.limit:.0f}s); actor killed and replaced",
            )
        ref = done[0]
        if ref in self.starting:
            self._started(ref)
            return None
        actor, url, attempt, t0 = self.running.pop(ref)
        try:
            stats = ray.get(ref)
        except ray.exceptions.RayActorError as e:  # the actor died (OOM, SIGKILL, node lost): replace it
            self._replace(actor)
            return Outcome(url, attempt, error=f"actor died: {_first_line(e)}")
        except ray.exceptions.RayTaskError as e:  # the shard's code raised: the actor is fine
            self.idle.append(actor)
            cause = e.cause if getattr(e, "cause", None) is not None else e
            return _error_outcome(url, attempt, cause)
        except ray.exceptions.RayError as e:  # anything else from Ray: do not trust the actor
            self._replace(actor)
            return Outcome(url, attempt, error=f"ray error: {_first_line(e)}")
        self.idle.append(actor)
        self.deadline.observe(time.monotonic() - t0)
        return Outcome(url, attempt, stats)

    def _started(self, ref) -> None:
        actor = self.starting.pop(ref)
        try:
            info: ActorInfo = self.ray.get(ref)
        except self.ray.exceptions.RayError as e:  # died while loading models
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
        self.actor_infos.append(info)
        self.progress.note(f"actor ready ({info.line()}); {self.n_ready()} ready, {len(self.starting)} starting")

    def shutdown(self) -> None:
        for a in [*self.idle, *(a for a, *_ in self.running.values()), *self.starting.values()]:
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


def run_ray(plan: JobPlan, job: JobConfig, ensemble: EnsembleSpec, report: JobReport, processor=None) -> None:
    import ray

    ex = job.execution
    started_here = not ray.is_initialized()
    if started_here:
        address = ray_address(ex)
        local = address == "local"
        t0 = time.perf_counter()
        try:
            ray.init(
                address=address,
                num_cpus=ex.num_cpus if local else None,
                num_gpus=ex.num_gpus if local else None,
                include_dashboard=False,
                logging_level="WARNING",
                log_to_driver=True,
            )
        except ConnectionError as e:
            raise ConfigError(
                f"no Ray cluster at address {address!r} ({e}); start one (`ray start --head`), "
                "fix execution.address / --address, or leave both unset for a local Ray"
            ) from None
        if local:  # a killed driver must not leave its Ray processes behind
            from dr_pipeline.execute import watchdog

            watchdog.guard(watchdog.local_ray_pids())
    pool = None
    progress = Progress(len(plan.todo))
    if started_here:
        progress.note(f"Ray started in {time.perf_counter() - t0:.1f}s ({ray_address(ex)})")
    try:
        pool = RayActorPool(plan, job, ensemble, progress, processor)
        progress.note(
            f"reinforcing {len(plan.todo)} shards on up to {pool.target} actor(s) "
            f"({ex.cpus_per_actor:g} CPU, {ex.gpus_per_actor:g} GPU each; "
            f"{len(plan.skipped)} shard(s) already committed)"
        )
        _retry_loop(plan, pool, report, ex, progress)
    except PoolError as e:
        report.error = str(e)
    finally:
        progress.close()
        if pool is not None:
            pool.shutdown()
        if started_here:
            ray.shutdown()


def run_job(
    job: JobConfig, ensemble: EnsembleSpec, force: bool = False, executor: str = "ray", processor=None
) -> JobReport:
    """Plan, run (``executor``: "ray" or "local") and write the manifest; resumable at any point."""
    t0 = time.time()
    plan = plan_job(job, ensemble, force)
    report = JobReport(skipped=[shard_name(u) for u in plan.skipped], manifest=plan.manifest)
    try:
        if plan.todo:
            (run_ray if executor == "ray" else run_local)(plan, job, ensemble, report, processor)
    finally:  # also on Ctrl-C: what committed is in the manifest
        report.seconds = time.time() - t0
        plan.manifest.finished_at = round(time.time(), 3)
        manifest = plan.dataset.write_manifest(plan.manifest)
        if plan.todo:  # the pool is shut down: temporary files of killed attempts can go now
            plan.dataset.clean_tmp()
    print(
        f"done: {manifest['n_shards']}/{manifest['n_input_shards']} shards committed, "
        f"{manifest['n_written']} samples written, {manifest['n_rejected']} rejected, "
        f"{len(report.failed)} shard(s) failed, {len(report.retried)} attempt(s) retried, "
        f"{report.seconds:.1f}s -> {redact_url(plan.dataset.root)}",
        file=sys.stderr,
        flush=True,
    )
    if report.failed:
        print(
            "some shards failed (one line each above); fix the cause and rerun the same command: "
            "it resumes and redoes only those",
            file=sys.stderr,
            flush=True,
        )
    if report.error:
        print(f"job stopped: {report.error}", file=sys.stderr, flush=True)
    return report


def resolve_ensemble(job: JobConfig) -> EnsembleSpec:
    from dr_pipeline.config import load_ensemble

    path = job.ensemble_path()
    if not Path(path).is_file():
        raise ConfigError(f"teachers file not found: {path} (set 'teachers:' to a file in teachers/)")
    return load_ensemble(path)


__all__ = ["JobPlan", "JobReport", "PoolError", "plan_job", "ray_address", "resolve_ensemble", "run_job"]
