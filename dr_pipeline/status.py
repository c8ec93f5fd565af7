"""``dr status OUTPUT``: where a running or finished job stands, from its files alone.

It reads what the driver leaves in storage: the manifest (the driver's checkpoint: committed
shards, totals, failures, written at plan time, every ``execution.manifest_every_s`` and at
the end) and the markers committed since (one listing, bodies read concurrently). So it costs
a handful of storage calls on a job of any size and never touches a running driver or Ray.
Throughput and ETA come from the markers' commit timestamps over the recent window.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, field

from dr_pipeline.config import ConfigError
from dr_pipeline.shards.dataset import FailedShard, Manifest, ReinforcedDataset, stage_shares
from dr_pipeline.storage.retry import redact_url

WINDOW_S = 900.0  # throughput over the commits of the last 15 minutes (or all, if fewer)


@dataclass
class JobStatus:
    dataset: str
    config_hash: str
    complete: bool
    shards_committed: int
    shards_total: int
    samples_written: int
    samples_rejected: int
    rejected_by_reason: dict[str, int]
    failed: list[FailedShard]
    shards_per_hour: float
    samples_per_s: float
    eta_s: float | None  # None: finished, or no rate yet
    last_commit_age_s: float | None
    stage_s: dict[str, float]
    stage_shares: str
    captions_resampled: dict[str, int]
    markers_after_checkpoint: int  # committed since the manifest was last written
    finished: bool  # the driver's final manifest write happened and nothing was committed since
    teachers: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)

    def render(self) -> str:
        left = self.shards_total - self.shards_committed
        if self.complete:
            state = "finished, complete"
        elif self.finished:
            state = f"finished, {left} shard(s) not committed ({len(self.failed)} failed); rerun the job to resume"
        else:
            state = "running, or stopped before its final manifest write"
        lines = [
            f"dataset    : {self.dataset} (config {self.config_hash}; teachers {', '.join(self.teachers)})",
            f"state      : {state}",
            f"shards     : {self.shards_committed}/{self.shards_total} committed"
            f" ({100 * self.shards_committed / max(self.shards_total, 1):.1f}%)",
            f"samples    : {self.samples_written} written, {self.samples_rejected} rejected"
            + (
                " (" + ", ".join(f"{r} {n}" for r, n in self.rejected_by_reason.items()) + ")"
                if self.rejected_by_reason
                else ""
            ),
            f"throughput : {self.shards_per_hour:.1f} shards/h, {self.samples_per_s:.1f} samples/s"
            + (f", last commit {self.last_commit_age_s:.0f}s ago" if self.last_commit_age_s is not None else ""),
            "ETA        : " + ("-" if self.eta_s is None else _duration(self.eta_s)),
            f"stages     : {self.stage_shares or '-'}",
        ]
        if any(self.captions_resampled.values()):
            lines.append("resampled  : " + ", ".join(f"{c} {n}" for c, n in self.captions_resampled.items()))
        lines += [f"FAILED {f.shard} ({f.attempts} attempt(s)): {f.error}" for f in self.failed]
        return "\n".join(lines)


def _duration(s: float) -> str:
    if s < 120:
        return f"{s:.0f}s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h" if s < 172800 else f"{s / 86400:.1f} days"


def job_status(root: str, storage_options: dict | None = None, now: float | None = None) -> JobStatus:
    ds = ReinforcedDataset(root, storage_options)
    if not ds.is_dataset():
        raise ConfigError(f"{redact_url(root)}: not a dr_pipeline dataset (no dataset.json or _markers/ there)")
    config_hash = ds.config_hash() or ""
    old = ds.read_manifest()
    n_total = old.n_input_shards if old else 0
    fresh = Manifest(config_hash, old.teachers if old else [], old.captioners if old else [], n_total)
    li = ds.listing()
    state = ds.resume_state(fresh, set(li.markers))
    m = state.manifest
    if old is not None and old.config_hash == config_hash:
        m.failed = [f for f in old.failed if f.shard not in m.shards]
    now = time.time() if now is None else now
    finished = sorted(e.finished_at for e in m.shards.values() if e.finished_at)
    recent = [t for t in finished if t >= now - WINDOW_S] if finished else []
    window = recent if len(recent) >= 2 else finished
    rate = 0.0
    samples_rate = 0.0
    if len(window) >= 2 and window[-1] > window[0]:
        rate = (len(window) - 1) / (window[-1] - window[0])
        per_shard = sum(e.n_written for e in m.shards.values()) / max(len(m.shards), 1)
        samples_rate = rate * per_shard
    left = max(n_total - len(m.shards), 0)
    totals = m.totals()
    reasons = Counter(totals["rejected_by_reason"])
    return JobStatus(
        dataset=redact_url(root),
        config_hash=config_hash,
        complete=bool(n_total) and left == 0,
        shards_committed=len(m.shards),
        shards_total=n_total,
        samples_written=totals["n_written"],
        samples_rejected=totals["n_rejected"],
        rejected_by_reason=dict(reasons.most_common()),
        failed=m.failed,
        shards_per_hour=rate * 3600,
        samples_per_s=samples_rate,
        eta_s=(left / rate if rate > 0 and left else None),
        last_commit_age_s=(now - finished[-1]) if finished else None,
        stage_s={k: round(v, 3) for k, v in sorted(m.stage_s.items())},
        stage_shares=stage_shares(m.stage_s),
        captions_resampled=dict(m.captions_resampled),
        markers_after_checkpoint=state.markers_read,
        finished=bool(old is not None and old.config_hash == config_hash and old.finished_at)
        and not state.markers_read,
        teachers=m.teachers,
    )
