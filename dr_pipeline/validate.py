"""``dr validate``: check every shard of a reinforced dataset against its contract.

Problems are collected, not raised: the report names every bad shard and what is wrong,
and the CLI exits non-zero if there is any.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml

from dr_pipeline import augment
from dr_pipeline.config import AugSpec, from_dict
from dr_pipeline.corpus.readers import Rejected, expand_urls, iter_shard, shard_name
from dr_pipeline.execute.dataset_dir import DatasetDir
from dr_pipeline.shards.parquet_io import decode_table
from dr_pipeline.shards.schema import SCHEMA_VERSION, layout_from_metadata, read_metadata

NORM_TOL = 2e-2      # bf16 has an 8-bit mantissa: |x| of a unit vector is off by ~1e-3 per element


@dataclass
class ValidationReport:
    shards: int = 0
    samples: int = 0
    problems: list[tuple[str, str]] = field(default_factory=list)     # (shard, message)
    warnings: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, shard: str, msg: str) -> None:
        self.problems.append((shard, msg))

    def render(self) -> str:
        lines = [f"{self.shards} committed shard(s), {self.samples} samples checked"]
        lines += [f"WARNING {s}: {m}" for s, m in self.warnings]
        lines += [f"ERROR   {s}: {m}" for s, m in self.problems]
        lines.append("OK" if self.ok else f"FAILED: {len(self.problems)} problem(s)")
        return "\n".join(lines)


def _read_bytes(ds: DatasetDir, rel: str) -> bytes:
    with ds.fs.open(ds._p(rel), "rb") as f:
        return f.read()


def check_rows(name: str, table: pa.Table, marker: dict, rep: ValidationReport) -> None:
    rows, meta = decode_table(table)
    layout = layout_from_metadata(meta)
    if meta.get("schema_version") != SCHEMA_VERSION:
        rep.add(name, f"schema_version {meta.get('schema_version')} != {SCHEMA_VERSION}")
    expected = layout.arrow_schema()
    if not table.schema.remove_metadata().equals(expected):
        rep.add(name, "columns/types differ from schemas/reinforced-v1.json for this ensemble")
    n = len(rows)
    rep.samples += n
    if n != marker["n_written"]:
        rep.add(name, f"{n} rows but the marker says n_written={marker['n_written']}")
    if marker["n_read"] != marker["n_written"] + marker["n_rejected"]:
        rep.add(name, f"n_read {marker['n_read']} != n_written {marker['n_written']} + n_rejected {marker['n_rejected']}")
    if sum(marker["rejected_by_reason"].values()) != marker["n_rejected"] or len(marker["rejected_keys"]) != marker["n_rejected"]:
        rep.add(name, "rejection counts by reason / rejected keys do not add up to n_rejected")
    dup = [k for k, c in Counter(rows.keys).items() if c > 1]
    if dup:
        rep.add(name, f"{len(dup)} duplicate key(s), e.g. {dup[0]!r}")
    spec = from_dict(AugSpec, meta["aug"])
    try:
        for i in range(n):
            ps = augment.unpack(rows.aug_params[i])
            if len(ps) != spec.n_aug:
                raise ValueError(f"row {i}: {len(ps)} aug params, expected {spec.n_aug}")
    except ValueError as e:
        rep.add(name, f"aug params not decodable: {e}")
    for t in layout.teachers:
        embs = {"image": rows.image_emb[t.id].float().reshape(-1, t.dim), "text": rows.text_emb[t.id].float()}
        for cap in layout.captioners:
            syn = rows.syn_emb[t.id][cap]
            if [len(s) for s in syn] != [len(c) for c in rows.syn[cap]]:
                rep.add(name, f"teacher {t.id}: synthetic-caption embeddings do not match captions of {cap}")
            embs[f"syn/{cap}"] = torch.cat([s.float() for s in syn]) if syn else torch.zeros(0, t.dim)
        for kind, e in embs.items():
            if e.numel() == 0:
                continue
            if not torch.isfinite(e).all():
                rep.add(name, f"teacher {t.id} {kind} embeddings hold non-finite values")
                continue
            norms = e.norm(dim=-1)
            bad = int(((norms - 1).abs() > NORM_TOL).sum())
            if bad:
                rep.add(name, f"teacher {t.id} {kind}: {bad} embedding(s) not unit-norm (min {norms.min():.3f}, max {norms.max():.3f})")


def check_base(name: str, url: str, written: list[str], marker: dict, storage_options: dict,
               rep: ValidationReport) -> None:
    """Every key of the base shard is written or rejected, and nothing else appears."""
    base = Counter(item.key for item in iter_shard(url, storage_options))
    got = Counter(written) + Counter(k for k, _, _ in marker["rejected_keys"])
    missing = base - got
    extra = got - base
    if missing:
        rep.add(name, f"{sum(missing.values())} base sample(s) neither written nor rejected, e.g. {next(iter(missing))!r}")
    if extra:
        rep.add(name, f"{sum(extra.values())} output/rejected key(s) not in the base shard, e.g. {next(iter(extra))!r}")


def validate_dataset(root: str, storage_options: dict | None = None, check_base_keys: bool = True) -> ValidationReport:
    ds = DatasetDir(root, storage_options)
    rep = ValidationReport()
    job_text = ds.read_text("job.yaml")
    if job_text is None:
        rep.add("-", f"{root} has no job.yaml: not a dr_pipeline dataset (or not written yet)")
        return rep
    job = yaml.safe_load(job_text)
    markers = ds.markers()
    input_so = storage_options if job["input"]["storage_options"] in ({}, None) else job["input"]["storage_options"]
    try:
        inputs = {shard_name(u): u for u in expand_urls(job["input"]["urls"], input_so)}
    except Exception as e:
        inputs = {}
        rep.warnings.append(("-", f"base corpus not readable, base-key checks skipped ({e})"))
        check_base_keys = False
    for name in sorted(set(inputs) - set(markers)):
        rep.add(name, "missing: input shard has no committed output shard")
    for name in sorted(set(ds.data_files()) - set(markers)):
        rep.warnings.append((name, "data file without marker (uncommitted, ignored by readers)"))
    for name, marker in markers.items():
        rep.shards += 1
        rel = marker.get("data_file", f"shards/{name}.parquet")
        try:
            data = _read_bytes(ds, rel)
        except FileNotFoundError:
            rep.add(name, f"missing data file {rel} (marker exists)")
            continue
        if len(data) != marker["bytes"] or hashlib.sha256(data).hexdigest() != marker["sha256"]:
            rep.add(name, f"checksum mismatch: {rel} differs from its marker (corrupted or replaced)")
        try:
            table = pq.read_table(pa.BufferReader(data))
            read_metadata(table.schema)
        except Exception as e:
            rep.add(name, f"unreadable Parquet: {type(e).__name__}: {e}")
            continue
        try:
            check_rows(name, table, marker, rep)
        except Exception as e:
            rep.add(name, f"contract check failed: {type(e).__name__}: {e}")
            continue
        if check_base_keys and name in inputs:
            try:
                check_base(name, inputs[name], table.column("key").to_pylist(), marker, input_so or {}, rep)
            except Exception as e:
                rep.add(name, f"base shard not readable for the key check: {type(e).__name__}: {e}")
    manifest = ds.read_json("manifest.json")
    if manifest is None:
        rep.warnings.append(("-", "no manifest.json (job not finished?)"))
    else:
        for name, m in manifest.get("shards", {}).items():
            if name in markers and m["sha256"] != markers[name]["sha256"]:
                rep.add(name, "manifest checksum differs from the marker")
    return rep


def rejected_reasons(marker: dict) -> Counter:
    return Counter(marker["rejected_by_reason"])


__all__ = ["validate_dataset", "ValidationReport", "Rejected", "np"]
