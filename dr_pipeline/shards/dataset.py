"""The reinforced dataset on disk: layout, typed marker, commit protocol, resume, manifest.

```
ROOT/shards/{name}.parquet     data files (only Parquet here, so the folder opens as a dataset)
ROOT/_markers/{name}.json      ShardStats = commit marker, written after the data file is complete
ROOT/_tmp/                     local temporary files (never read)
ROOT/job.yaml, ensemble.yaml   what made the dataset (secrets redacted)
ROOT/dataset.json              config hash, schema version, a per-key fingerprint of the config
ROOT/manifest.json             every committed shard with counts, bytes, checksum; totals; failures
ROOT/README.md                 dataset card (Hugging Face ``load_dataset(ROOT)`` finds the shards)
```
A shard exists for readers only once its marker exists. On a local file system the data
file is written under ``_tmp`` and renamed into place (atomic); on object stores, where
rename is not atomic, it is uploaded to its final name and the marker alone commits it.
Rewriting a shard first removes its old marker, so readers never pair an old marker with
new (or half-uploaded) data.

The manifest is also the driver's checkpoint (docs/cluster.md, "driver at scale"): the driver
keeps committed stats from the actors' results in memory, rewrites the manifest every so
often and at the end, and a resume trusts its entries (same config hash, data file of the
listed size) so that planning 200,000 shards costs two listings and a handful of reads; only
markers committed after the last checkpoint are read, concurrently.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dr_pipeline.config import ConfigError, EnsembleSpec, JobConfig, from_dict, redact, strip_redacted
from dr_pipeline.shards.schema import SCHEMA_VERSION, check_version
from dr_pipeline.storage.folder import Folder, file_digest
from dr_pipeline.storage.retry import RetryPolicy, redact_url

SHARDS, MARKERS, TMP = "shards", "_markers", "_tmp"
MANIFEST, DATASET_JSON, JOB_YAML, ENSEMBLE_YAML, CARD = (
    "manifest.json",
    "dataset.json",
    "job.yaml",
    "ensemble.yaml",
    "README.md",
)


# --------------------------------------------------------------------------- the marker


@dataclass
class ShardStats:
    """One committed shard: the marker file's content (``schemas/shard-stats-v1.schema.json``).

    ``stage_s`` holds seconds per stage: ``read``, ``decode_augment`` (both in the reader
    threads, so they overlap the model stages), ``caption:{id}``, ``teacher:{id}:image``,
    ``teacher:{id}:text``, ``write``, ``commit`` and ``wait_input`` (the model loop waiting for
    decoded batches). ``captions_resampled`` counts caption rows redrawn per captioner.
    """

    shard: str
    input_url: str
    config_hash: str
    n_read: int
    n_written: int
    n_rejected: int
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    rejected_keys: list[list[str]] = field(default_factory=list)  # [key, reason, detail], read order
    captions_rejected: dict[str, dict[str, int]] = field(default_factory=dict)
    captions_resampled: dict[str, int] = field(default_factory=dict)
    damaged: list[dict[str, Any]] = field(default_factory=list)  # framing damage the reader skipped
    teachers: list[str] = field(default_factory=list)
    captioners: list[str] = field(default_factory=list)
    seconds: float = 0.0
    stage_s: dict[str, float] = field(default_factory=dict)
    started_at: float = 0.0
    finished_at: float = 0.0
    host: str = ""
    pid: int = 0
    peak_rss: int = 0  # bytes: the writing process's peak resident memory so far
    bytes: int = 0
    sha256: str = ""
    data_file: str = ""
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.n_read != self.n_written + self.n_rejected:
            raise ValueError(
                f"{self.shard}: read {self.n_read} != written {self.n_written} + rejected {self.n_rejected}"
            )

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, obj: dict) -> ShardStats:
        """Parse a marker; fields added within v1 are ignored, a newer version refused (schemas/README.md)."""
        check_version(obj.get("schema_version", SCHEMA_VERSION), f"marker of {obj.get('shard', '?')!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in obj.items() if k in names})


@dataclass
class ManifestEntry:
    """What the manifest keeps of a committed shard (enough to resume and to report)."""

    input_url: str
    config_hash: str
    n_read: int
    n_written: int
    n_rejected: int
    bytes: int
    sha256: str
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    finished_at: float = 0.0
    seconds: float = 0.0

    @classmethod
    def of(cls, s: ShardStats) -> ManifestEntry:
        return cls(
            s.input_url,
            s.config_hash,
            s.n_read,
            s.n_written,
            s.n_rejected,
            s.bytes,
            s.sha256,
            dict(s.rejected_by_reason),
            s.finished_at,
            s.seconds,
        )


@dataclass
class FailedShard:
    shard: str
    url: str
    error: str
    attempts: int
    permanent: bool = False


TIMING_KEYS = ("finished_at", "seconds", "stage_s", "started_at", "updated_at")  # differ between identical runs


@dataclass
class Manifest:
    """Every committed shard of one config, totals and failures; kept in memory by the driver
    and written (``ReinforcedDataset.write_manifest``) periodically and at the end."""

    config_hash: str
    teachers: list[str]
    captioners: list[str]
    n_input_shards: int
    shards: dict[str, ManifestEntry] = field(default_factory=dict)
    failed: list[FailedShard] = field(default_factory=list)
    stage_s: Counter = field(default_factory=Counter)  # seconds per stage, summed over committed shards
    captions_resampled: Counter = field(default_factory=Counter)
    started_at: float = 0.0
    finished_at: float = 0.0  # set by the driver's final write: the run ended (complete or not)

    def add(self, s: ShardStats) -> None:
        """Record a committed shard (replacing an older entry of the same name)."""
        self.shards[s.shard] = ManifestEntry.of(s)
        self.stage_s.update(s.stage_s)
        self.captions_resampled.update(s.captions_resampled)

    @property
    def complete(self) -> bool:
        return len(self.shards) == self.n_input_shards

    def totals(self) -> dict:
        reasons: Counter = Counter()
        for e in self.shards.values():
            reasons.update(e.rejected_by_reason)
        return {
            "n_written": sum(e.n_written for e in self.shards.values()),
            "n_rejected": sum(e.n_rejected for e in self.shards.values()),
            "bytes": sum(e.bytes for e in self.shards.values()),
            "rejected_by_reason": dict(sorted(reasons.items())),
        }

    def to_json(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "config_hash": self.config_hash,
            "teachers": self.teachers,
            "captioners": self.captioners,
            "complete": self.complete,
            "n_shards": len(self.shards),
            "n_input_shards": self.n_input_shards,
            **self.totals(),
            "stage_s": {k: round(v, 3) for k, v in sorted(self.stage_s.items())},
            "captions_resampled": dict(sorted(self.captions_resampled.items())),
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "updated_at": round(time.time(), 3),
            "failed": [dataclasses.asdict(f) for f in self.failed],
            "shards": {n: dataclasses.asdict(e) for n, e in sorted(self.shards.items())},
        }

    @classmethod
    def from_json(cls, obj: dict) -> Manifest:
        check_version(obj.get("schema_version", SCHEMA_VERSION), "manifest.json")
        entry_fields = {f.name for f in dataclasses.fields(ManifestEntry)}
        return cls(
            config_hash=obj.get("config_hash", ""),
            teachers=list(obj.get("teachers", [])),
            captioners=list(obj.get("captioners", [])),
            n_input_shards=int(obj.get("n_input_shards", 0)),
            shards={
                n: ManifestEntry(**{k: v for k, v in e.items() if k in entry_fields})
                for n, e in obj.get("shards", {}).items()
            },
            failed=[FailedShard(**f) for f in obj.get("failed", [])],
            stage_s=Counter(obj.get("stage_s", {})),
            captions_resampled=Counter(obj.get("captions_resampled", {})),
            started_at=float(obj.get("started_at", 0.0)),
            finished_at=float(obj.get("finished_at", 0.0)),
        )


def stage_shares(stage_s: dict[str, float], top: int = 4) -> str:
    """'caption:coca 61% teacher:a:image 22% ...': shares of the model-side stages (the reader's
    stages run in threads that overlap them, so they are left out)."""
    model = {k: v for k, v in stage_s.items() if k not in ("read", "decode_augment")}
    total = sum(model.values())
    if total <= 0:
        return ""
    parts = sorted(model.items(), key=lambda kv: -kv[1])[:top]
    return " ".join(f"{k} {v / total:.0%}" for k, v in parts)


def deterministic(manifest_json: dict) -> dict:
    """A manifest (as JSON) without its timing fields: equal for two runs that wrote the same data."""
    out = {k: v for k, v in manifest_json.items() if k not in TIMING_KEYS}
    out["shards"] = {
        n: {k: v for k, v in e.items() if k not in TIMING_KEYS} for n, e in manifest_json.get("shards", {}).items()
    }
    return out


# --------------------------------------------------------------------------- the dataset


@dataclass
class Listing:
    """One listing of ``_markers/`` and one of ``shards/``: name -> size in bytes."""

    markers: dict[str, int]
    data: dict[str, int]


@dataclass
class ResumeState:
    """What planning found: the manifest of committed shards to skip, and stale markers to drop."""

    manifest: Manifest  # committed shards of this config (entries + carried totals)
    stale: list[str]  # markers of another config or with a missing/replaced data file
    other_hashes: set[str]  # config hashes found other than the job's
    markers_read: int  # marker bodies read (those a trusted manifest did not vouch for)


class ReinforcedDataset:
    """A reinforced dataset at ``root`` (any fsspec URL)."""

    def __init__(self, root: str, storage_options: dict | None = None, retry: RetryPolicy | None = None):
        self.folder = Folder(root, storage_options, retry)
        self.root = self.folder.root
        self.local = self.folder.local

    def __repr__(self) -> str:
        return f"ReinforcedDataset({redact_url(self.root)!r})"

    # ---------------------------------------------------------------- paths
    def shard_url(self, name: str) -> str:
        return self.folder.url(SHARDS, f"{name}.parquet")

    @staticmethod
    def data_rel(name: str) -> str:
        return f"{SHARDS}/{name}.parquet"

    @staticmethod
    def marker_rel(name: str) -> str:
        return f"{MARKERS}/{name}.json"

    def is_dataset(self) -> bool:
        """Whether ``root`` looks like a dataset this project wrote (has dataset.json or markers)."""
        return self.folder.exists(DATASET_JSON) or self.folder.exists(MARKERS)

    # ---------------------------------------------------------------- reading
    def listing(self) -> Listing:
        def names(rel: str, ext: str) -> dict[str, int]:
            return {
                e.name[: -len(ext)]: e.size
                for e in self.folder.list(rel)
                if not e.is_dir and e.name.endswith(ext) and not e.name.startswith(".")
            }

        return Listing(names(MARKERS, ".json"), names(SHARDS, ".parquet"))

    def read_markers(self, names: list[str]) -> dict[str, ShardStats]:
        """The markers of ``names``, read concurrently; a marker removed since the listing is skipped."""
        got = self.folder.read_many([self.marker_rel(n) for n in names])
        return {
            n: ShardStats.from_json(json.loads(got[self.marker_rel(n)]))
            for n in names
            if got[self.marker_rel(n)] is not None
        }

    def markers(self) -> dict[str, ShardStats]:
        """Committed shards (marker present): name -> stats. Readers must go through this."""
        return self.read_markers(sorted(self.listing().markers))

    def committed(self) -> list[str]:
        """Names of committed shards whose data file exists, from the listings alone."""
        li = self.listing()
        return sorted(set(li.markers) & set(li.data))

    def read_manifest(self) -> Manifest | None:
        obj = self.folder.read_json(MANIFEST)
        return None if obj is None else Manifest.from_json(obj)

    def config_hash(self) -> str | None:
        rec = self.folder.read_json(DATASET_JSON)
        return rec.get("config_hash") if rec else None

    def resume_state(self, fresh: Manifest, wanted: set[str]) -> ResumeState:
        """Which of the ``wanted`` shards are committed for ``fresh.config_hash``, in O(shards) time
        and a bounded number of storage calls: two listings, the manifest, and the bodies (read
        concurrently) of the markers the manifest does not vouch for (committed after its last
        checkpoint, or by another config). Returns ``fresh`` filled with the committed shards."""
        li = self.listing()
        old = self.read_manifest()
        trusted = old if old is not None and old.config_hash == fresh.config_hash else None
        known = trusted.shards if trusted else {}
        unknown = [n for n in li.markers if n not in known]
        read = self.read_markers(unknown)
        if trusted:  # carry the totals of work done by earlier runs of this config
            fresh.stage_s.update(trusted.stage_s)
            fresh.captions_resampled.update(trusted.captions_resampled)
            fresh.started_at = trusted.started_at
        stale, other = [], set()

        def consider(n: str, e: ManifestEntry, stats: ShardStats | None) -> None:
            if e.config_hash != fresh.config_hash:
                other.add(e.config_hash)
                stale.append(n)
            elif li.data.get(n) != e.bytes or n not in wanted:  # data missing / replaced: redo, unseen meanwhile
                stale.append(n)
            elif stats is not None:
                fresh.add(stats)
            else:
                fresh.shards[n] = e

        for n, e in known.items():
            if n in li.markers:
                consider(n, e, None)
        for n, st in read.items():
            consider(n, ManifestEntry.of(st), st)
        return ResumeState(fresh, sorted(stale), other, len(unknown))

    # ---------------------------------------------------------------- writing
    def ensure(self) -> None:
        for d in (SHARDS, MARKERS):
            self.folder.makedirs(d)

    def new_tmp_file(self, name: str) -> str:
        """A local temporary path for a shard's data file (same file system as ROOT if local).
        The name carries the writing process's pid: a leftover file says who left it."""
        d = Path(self.folder.path_of(TMP)) if self.local else Path(tempfile.gettempdir()) / "dr_pipeline"
        d.mkdir(parents=True, exist_ok=True)
        return str(d / f"{name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.parquet")

    def clean_tmp(self) -> int:
        """Remove temporary files left by killed writers (local datasets; call when no job runs)."""
        if not self.local:
            return 0
        d = Path(self.folder.path_of(TMP))
        n = 0
        for f in d.glob("*.parquet") if d.is_dir() else []:
            f.unlink(missing_ok=True)
            n += 1
        return n

    def commit(self, tmp_file: str, stats: ShardStats) -> ShardStats:
        """Commit a finished data file: drop any old marker, put the data in place, then write
        the marker (the commit point). A crash anywhere leaves at most an unmarked data file,
        which readers ignore and the shard's next attempt overwrites."""
        t0 = time.time()
        size, digest = file_digest(tmp_file)
        name = stats.shard
        self.uncommit(name)
        self.folder.put_file(tmp_file, self.data_rel(name))
        stats = dataclasses.replace(stats, bytes=size, sha256=digest, data_file=self.data_rel(name))
        stats.stage_s["commit"] = round(time.time() - t0, 4)
        stats.finished_at = round(time.time(), 3)
        self.folder.write_json(self.marker_rel(name), stats.to_json())
        return stats

    def uncommit(self, name: str) -> None:
        """Remove a shard's marker (first step of rewriting a committed shard)."""
        self.folder.remove(self.marker_rel(name))

    def write_manifest(self, manifest: Manifest) -> dict:
        obj = manifest.to_json()
        self.folder.write_json(MANIFEST, obj, indent=None)
        return obj

    def write_job_record(self, job: JobConfig, ensemble: EnsembleSpec, config_hash: str) -> None:
        """dataset.json, job.yaml, ensemble.yaml (secrets redacted) and the dataset card."""
        self.folder.write_json(
            DATASET_JSON,
            {
                "config_hash": config_hash,
                "schema_version": SCHEMA_VERSION,
                "fingerprint": job.output_fingerprint(ensemble),
            },
        )
        self.folder.write_text(JOB_YAML, yaml.safe_dump(redact(job), sort_keys=False))
        self.folder.write_text(ENSEMBLE_YAML, yaml.safe_dump(redact(ensemble), sort_keys=False))
        self.folder.write_text(CARD, dataset_card(ensemble, config_hash))

    def changed_keys(self, job: JobConfig, ensemble: EnsembleSpec) -> list[str]:
        """The config keys that differ from the config that made this dataset ([] if unknown)."""
        rec = self.folder.read_json(DATASET_JSON) or {}
        old = rec.get("fingerprint") or {}
        new = job.output_fingerprint(ensemble)
        return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def dataset_card(ensemble: EnsembleSpec, config_hash: str) -> str:
    """A Hugging Face dataset card: its ``configs`` block makes ``load_dataset(ROOT)`` read the shards."""
    teachers = ", ".join(f"{t.id} ({t.model})" for t in ensemble.teachers) or "none"
    captioners = ", ".join(f"{c.id} ({c.model})" for c in ensemble.captioners) or "none"
    return (
        "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: shards/*.parquet\n"
        "tags:\n- dataset-reinforcement\n- clip\n---\n\n"
        "# Reinforced dataset (dr_pipeline)\n\n"
        f"Teachers: {teachers}. Captioners: {captioners}. Config hash `{config_hash}`.\n\n"
        "One row per base sample: stored augmentation parameters, synthetic captions and bf16 "
        "teacher embeddings (raw 16-bit values in `uint16` lists). Rows join the base corpus by shard "
        "name and `key`. Only shards with a marker in `_markers/` are committed; `manifest.json` lists them.\n"
    )


def load_dataset_config(ds: ReinforcedDataset) -> tuple[JobConfig, EnsembleSpec]:
    """The job and ensemble that made ``ds``, as typed configs. Secrets were redacted when they were
    dumped: the redacted values are dropped here, so the caller's credentials apply."""
    job_text, ens_text = ds.folder.read_text(JOB_YAML), ds.folder.read_text(ENSEMBLE_YAML)
    if job_text is None or ens_text is None:
        raise ConfigError(f"{redact_url(ds.root)}: not a dr_pipeline dataset (no job.yaml / ensemble.yaml)")
    job = from_dict(JobConfig, strip_redacted(yaml.safe_load(job_text)))
    return job, from_dict(EnsembleSpec, strip_redacted(yaml.safe_load(ens_text)))


__all__ = [
    "FailedShard",
    "Listing",
    "Manifest",
    "ManifestEntry",
    "ReinforcedDataset",
    "ResumeState",
    "ShardStats",
    "deterministic",
    "load_dataset_config",
    "stage_shares",
]
