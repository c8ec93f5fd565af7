"""``dr validate``: check every shard of a reinforced dataset against its contract.

Problems are collected, not raised: the report names every bad shard and what is wrong,
and the CLI exits non-zero if there is any. Checked per shard: the marker parses and its
counts add up (read = written + rejected, by reason and by key); the data file exists and
matches the marker's size and sha256 (a flipped byte, a truncated or replaced file); it
parses as Parquet with the contract's schema and as many rows as the marker says; every
base key is written or rejected; damaged framing of the base tar (recorded in the marker, or
found on re-reading) is named; the base corpus's own index (img2dataset ``_stats.json`` /
sidecar Parquet, a ``.idx``) agrees with the records read; every marker's, data file's and the
manifest's ``config_hash`` equals ``dataset.json``'s; every Parquet page is decoded (with its
CRC checked where the writer stored one). ``--deep`` (``DeepCheck``) also compares rows with
their base samples and recomputes the teachers' embeddings. Across shards: input shards without a
committed output are errors (with the job's error, from the manifest, when it failed);
keys that occur in several shards are a warning (rows join base shards by shard name and
key, so this is legal, but usually a sign of an un-deduplicated corpus).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from dr_pipeline import augment
from dr_pipeline.config import AugSpec, ConfigError, from_dict, safe_yaml, strip_redacted
from dr_pipeline.corpus.readers import Rejected, Sample, expand_urls, iter_shard, shard_index_count, shard_name
from dr_pipeline.images import decode_image
from dr_pipeline.shards.dataset import ReinforcedDataset
from dr_pipeline.shards.parquet_io import decode_table
from dr_pipeline.shards.schema import SCHEMA_VERSION, layout_from_metadata, read_metadata

NORM_TOL = 2e-2  # bf16 has an 8-bit mantissa: |x| of a unit vector is off by ~1e-3 per element
MARKER_FIELDS = ("n_read", "n_written", "n_rejected", "rejected_by_reason", "rejected_keys", "bytes", "sha256")


@dataclass
class ValidationReport:
    shards: int = 0
    samples: int = 0
    problems: list[tuple[str, str]] = field(default_factory=list)  # (shard, message)
    warnings: list[tuple[str, str]] = field(default_factory=list)
    rejected: Counter = field(default_factory=Counter)  # reason -> count, all markers
    deep_rows: int = 0  # rows --deep compared and recomputed

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, shard: str, msg: str) -> None:
        self.problems.append((shard, msg))

    def render(self) -> str:
        lines = [
            f"{self.shards} committed shard(s), {self.samples} samples checked"
            + (f", {self.deep_rows} row(s) checked deep" if self.deep_rows else "")
        ]
        if self.rejected:
            lines.append(
                f"{sum(self.rejected.values())} rejected: "
                + ", ".join(f"{r} {n}" for r, n in self.rejected.most_common())
            )
        lines += [f"WARNING {s}: {m}" for s, m in self.warnings]
        lines += [f"ERROR   {s}: {m}" for s, m in self.problems]
        lines.append("OK" if self.ok else f"FAILED: {len(self.problems)} problem(s)")
        return "\n".join(lines)


def _read_bytes(ds: ReinforcedDataset, rel: str) -> bytes:
    with ds.folder.fs.open(ds.folder.path_of(rel), "rb") as f:
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
                rep.add(
                    name,
                    f"teacher {t.id} {kind}: {bad} embedding(s) not unit-norm (min {norms.min():.3f}, max {norms.max():.3f})",
                )


def _damage_line(d: dict) -> str:
    end = "end of file" if d.get("end") is None else f"byte {d.get('end')}"
    lost = d.get("samples_lost")
    return (
        f"damaged tar: bytes {d.get('offset')}..{end} skipped ({d.get('members_skipped')} member(s), "
        f"samples lost: {'unknown' if lost is None else lost}): {d.get('detail', '')}"
    )


def report_damage(name: str, damaged: list, rep: ValidationReport) -> None:
    """Damaged framing of the base tar: an error where samples may be lost, else a warning."""
    for d in damaged or []:
        if not isinstance(d, dict):
            rep.add(name, f"marker 'damaged' entry malformed: {str(d)[:80]}")
        elif d.get("samples_lost") == 0:
            rep.warnings.append((name, _damage_line(d) + " (nothing lost)"))
        else:
            rep.add(name, _damage_line(d) + " (repair or re-download the base shard, then re-run the job for it)")


def check_base(
    name: str, url: str, written: list[str], marker: dict, storage_options: dict, rep: ValidationReport
) -> None:
    """Every key of the base shard is written or rejected, and nothing else appears; damaged
    framing the marker does not record is reported; the corpus's own index, if any, agrees."""
    base: Counter = Counter()
    damaged: list[dict] = []
    for item in iter_shard(url, storage_options, on_damage=lambda d: damaged.append(d.to_dict())):
        base[item.key] += 1
    if sum(base.values()) != marker["n_read"]:
        rep.add(
            name, f"the base shard has {sum(base.values())} record(s) but the marker says n_read={marker['n_read']}"
        )
    recorded = {(d.get("offset"), d.get("end")) for d in marker.get("damaged") or [] if isinstance(d, dict)}
    report_damage(name, [d for d in damaged if (d["offset"], d["end"]) not in recorded], rep)
    index = shard_index_count(url, storage_options)
    if index is not None and index[0] != sum(base.values()):
        rep.add(
            name,
            f"the corpus index {index[1]} says {index[0]} sample(s) but the base shard yields "
            f"{sum(base.values())} record(s) ({abs(index[0] - sum(base.values()))} unaccounted for)",
        )
    got = Counter(written) + Counter(k for k, _, _ in marker["rejected_keys"])
    missing = base - got
    extra = got - base
    if missing:
        rep.add(
            name, f"{sum(missing.values())} base sample(s) neither written nor rejected, e.g. {next(iter(missing))!r}"
        )
    if extra:
        rep.add(name, f"{sum(extra.values())} output/rejected key(s) not in the base shard, e.g. {next(iter(extra))!r}")


def _picked(key: str, fraction: float) -> bool:
    """A stable pseudo-random choice of rows (the same on every run)."""
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    return h < fraction * 2.0**64


class DeepCheck:
    """``dr validate --deep``: rows against their base samples, and teachers' embeddings recomputed.

    For the rows picked (``fraction``; at least one per shard): the base sample of the same key
    is read again and its image sha256, decoded width/height and caption must equal the row's; the
    stored aug params are replayed on that image and every teacher of the dataset's
    ``ensemble.yaml`` re-embeds the views, the GT caption and the synthetic captions, which must
    equal the stored bf16 values within bf16 rounding (``EMB_RTOL`` x |value| + ``EMB_ATOL``)."""

    EMB_RTOL = 2.0**-7  # 2 bf16 ulps
    EMB_ATOL = 2e-3  # float noise of a different batch / thread count

    def __init__(self, ds: ReinforcedDataset, fraction: float, device: str = "cpu"):
        self.ds, self.fraction, self.device = ds, fraction, device
        self._ensemble = None
        self._teachers: dict = {}

    def teacher(self, tid: str):
        from dr_pipeline.models.teachers import load_teacher
        from dr_pipeline.shards.dataset import load_dataset_config

        if self._ensemble is None:
            _, self._ensemble = load_dataset_config(self.ds)
        if tid not in self._teachers:
            self._teachers[tid] = load_teacher(self._ensemble.teacher(tid), self._ensemble, self.device)
        return self._teachers[tid]

    def _close(self, stored: torch.Tensor, fresh: torch.Tensor) -> bool:
        stored, fresh = stored.float().cpu(), fresh.float().cpu()
        return stored.shape == fresh.shape and bool(
            ((stored - fresh).abs() <= self.EMB_RTOL * fresh.abs() + self.EMB_ATOL).all()
        )

    def check(self, name: str, url: str, table: pa.Table, storage_options: dict, rep: ValidationReport) -> None:
        rows, meta = decode_table(table)
        want = {k: i for i, k in enumerate(rows.keys) if _picked(str(k), self.fraction)}
        if not want and len(rows):
            want = {rows.keys[0]: 0}
        found: dict[str, Sample] = {}
        for item in iter_shard(url, storage_options):
            if isinstance(item, Sample) and item.key in want and item.key not in found:
                found[item.key] = item
        spec = from_dict(AugSpec, meta["aug"])
        layout = layout_from_metadata(meta)
        bad: list[str] = []
        for key, i in want.items():
            s = found.get(key)
            if s is None:
                bad.append(f"{key!r}: not in the base shard")
                continue
            if hashlib.sha256(s.image).hexdigest() != rows.image_sha256[i]:
                bad.append(f"{key!r}: image sha256 differs from the base sample's (keys swapped or image replaced?)")
                continue
            img = decode_image(s.image)
            if img.size != (rows.widths[i], rows.heights[i]):
                bad.append(
                    f"{key!r}: width/height {rows.widths[i]}x{rows.heights[i]} != the base image's {img.size[0]}x{img.size[1]}"
                )
            if (s.caption or "") != rows.captions[i]:
                bad.append(f"{key!r}: caption differs from the base sample's")
            params = augment.unpack(rows.aug_params[i])
            with torch.inference_mode():
                for t in layout.teachers:
                    teacher = self.teacher(t.id)
                    views = torch.stack([augment.replay(img, p, teacher.image_size, spec) for p in params])
                    if not self._close(
                        rows.image_emb[t.id][i].reshape(len(params), t.dim), teacher.encode_images(views)
                    ):
                        bad.append(f"{key!r}: teacher {t.id} image embeddings differ from a recomputation")
                    if not self._close(rows.text_emb[t.id][i : i + 1], teacher.encode_texts([rows.captions[i]])):
                        bad.append(f"{key!r}: teacher {t.id} caption embedding differs from a recomputation")
                    for cap in layout.captioners:
                        texts = rows.syn[cap][i]
                        if texts and not self._close(rows.syn_emb[t.id][cap][i], teacher.encode_texts(list(texts))):
                            bad.append(
                                f"{key!r}: teacher {t.id} embeddings of {cap} captions differ from a recomputation"
                            )
        rep.deep_rows += len(want)
        if bad:
            rep.add(name, f"--deep: {len(bad)} problem(s) in {len(want)} checked row(s), e.g. {bad[0]}")


def check_marker(name: str, marker: dict, rep: ValidationReport) -> bool:
    """The marker's own counts add up. False if it lacks fields (then nothing else is checked)."""
    lacking = [f for f in MARKER_FIELDS if f not in marker]
    if lacking:
        rep.add(name, f"marker lacks {', '.join(lacking)} (corrupted marker; delete it and re-run the job)")
        return False
    try:
        reasons = Counter({str(r): int(c) for r, c in marker["rejected_by_reason"].items()})
        by_key = Counter(str(entry[1]) for entry in marker["rejected_keys"])
        n_read, n_written, n_rejected = (int(marker[f]) for f in ("n_read", "n_written", "n_rejected"))
    except (AttributeError, TypeError, ValueError, IndexError, KeyError) as e:
        rep.add(name, f"marker counts are malformed ({type(e).__name__}: {e}); delete it and re-run the job")
        return False
    rep.rejected.update(reasons)
    if n_read != n_written + n_rejected:
        rep.add(name, f"n_read {n_read} != n_written {n_written} + n_rejected {n_rejected}")
    if sum(reasons.values()) != n_rejected or len(marker["rejected_keys"]) != n_rejected:
        rep.add(name, "rejection counts by reason / rejected keys do not add up to n_rejected")
    elif +by_key != +reasons:
        rep.add(name, f"rejected keys by reason {dict(by_key)} differ from rejected_by_reason {dict(reasons)}")
    return True


def _markers(ds: ReinforcedDataset, rep: ValidationReport) -> dict[str, dict]:
    """Every marker file, parsed; an unparsable one is reported (ReinforcedDataset.markers would raise)."""
    out: dict[str, dict] = {}
    try:
        paths = ds.folder.fs.ls(ds.folder.path_of("_markers"), detail=False)
    except FileNotFoundError:
        return out
    for p in sorted(paths):
        base = p.rsplit("/", 1)[-1]
        if not base.endswith(".json") or base.startswith("."):
            continue
        name = base[:-5]
        try:
            marker = json.loads(_read_bytes(ds, f"_markers/{base}"))
            if not isinstance(marker, dict):
                raise ValueError(f"expected a JSON object, got {type(marker).__name__}")
        except (ValueError, UnicodeDecodeError) as e:
            rep.add(
                name,
                f"marker _markers/{base} unreadable ({type(e).__name__}: {str(e)[:120]}); "
                "delete it and re-run the job for this shard",
            )
            continue
        out[name] = marker
    return out


def _key_hashes(keys: list) -> np.ndarray:
    return np.array(
        [int.from_bytes(hashlib.blake2b(str(k).encode(), digest_size=8).digest(), "little") for k in keys],
        dtype=np.uint64,
    )


def check_cross_shard_duplicates(ds: ReinforcedDataset, hashes: dict[str, np.ndarray], rep: ValidationReport) -> None:
    """Warn about keys written by more than one shard (8-byte key hashes: bounded memory)."""
    names = [n for n, h in hashes.items() if len(h)]
    if len(names) < 2:
        return
    allh = np.concatenate([hashes[n] for n in names])
    sid = np.concatenate([np.full(len(hashes[n]), i) for i, n in enumerate(names)])
    order = np.argsort(allh, kind="stable")
    allh, sid = allh[order], sid[order]
    cross = (allh[1:] == allh[:-1]) & (sid[1:] != sid[:-1])
    if not cross.any():
        return
    dup = set(allh[1:][cross].tolist())
    shards = sorted({names[i] for i in np.concatenate([sid[1:][cross], sid[:-1][cross]]).tolist()})
    example = "?"
    try:
        table = pq.read_table(pa.BufferReader(_read_bytes(ds, f"shards/{shards[0]}.parquet")), columns=["key"])
        keys = table.column("key").to_pylist()
        example = next(k for k, h in zip(keys, _key_hashes(keys).tolist()) if h in dup)
    except Exception:  # noqa: BLE001 - the example is a courtesy
        pass
    rep.warnings.append(
        (
            ",".join(shards),
            f"{len(dup)} key(s) occur in more than one shard, e.g. {example!r} "
            "(legal: rows join base shards by shard name + key; deduplicate the base corpus "
            "if these are the same samples)",
        )
    )


def validate_dataset(
    root: str, storage_options: dict | None = None, check_base_keys: bool = True, deep: float | None = None
) -> ValidationReport:
    """``deep``: the fraction of rows (0..1] that ``DeepCheck`` checks against the base corpus and
    the teachers; None: no deep check."""
    ds = ReinforcedDataset(root, storage_options)
    rep = ValidationReport()
    job_text = ds.folder.read_text("job.yaml")
    if job_text is None:
        rep.add("-", f"{root} has no job.yaml: not a dr_pipeline dataset (or not written yet)")
        return rep
    try:
        job = safe_yaml(job_text, "job.yaml")
        job_input = job["input"]
    except (ConfigError, TypeError, KeyError) as e:
        rep.add("-", f"job.yaml unreadable ({type(e).__name__}); restore it from the job config")
        return rep
    markers = _markers(ds, rep)
    try:
        manifest = ds.folder.read_json("manifest.json")
    except ValueError as e:
        manifest = None
        rep.add("-", f"manifest.json unreadable ({type(e).__name__}); re-run the job to rewrite it")
    failed = {f.get("shard"): f for f in (manifest or {}).get("failed", []) if isinstance(f, dict)}
    try:
        dataset_hash = (ds.folder.read_json("dataset.json") or {}).get("config_hash")
    except ValueError:
        dataset_hash = None
    if dataset_hash is None:
        rep.add(
            "-",
            "dataset.json missing or unreadable: the config hash of the shards cannot be checked "
            "(re-run the job to rewrite it)",
        )
    elif manifest is not None and manifest.get("config_hash") != dataset_hash:
        rep.add("-", f"manifest.json config_hash {manifest.get('config_hash')} != dataset.json's {dataset_hash}")
    if deep is not None and not check_base_keys:
        rep.warnings.append(("-", "--deep needs the base corpus: skipped (--no-base)"))
    deep_check = DeepCheck(ds, deep) if deep is not None and check_base_keys else None
    # Secrets were redacted from job.yaml: use the options left (else the caller's) and the environment.
    input_so = strip_redacted(job_input.get("storage_options") or {}) or storage_options or {}
    try:
        inputs = {shard_name(u): u for u in expand_urls(job_input["urls"], input_so)}
    except Exception as e:
        inputs = {}
        rep.warnings.append(("-", f"base corpus not readable, base-key checks skipped ({e})"))
        check_base_keys = False
    for name in sorted(set(inputs) - set(markers) - {p[0] for p in rep.problems}):
        why = f" (the job failed it: {failed[name].get('error')})" if name in failed else ""
        rep.add(name, f"missing: input shard has no committed output shard{why}")
    for name in sorted(set(ds.listing().data) - set(markers) - {p[0] for p in rep.problems}):
        rep.warnings.append((name, "data file without marker (uncommitted, ignored by readers)"))
    hashes: dict[str, np.ndarray] = {}
    for name, marker in markers.items():
        rep.shards += 1
        if not check_marker(name, marker, rep):
            continue
        if dataset_hash is not None and marker.get("config_hash") != dataset_hash:
            rep.add(
                name,
                f"marker config_hash {marker.get('config_hash')} != dataset.json's {dataset_hash} "
                "(a shard of another config: delete its marker and re-run the job)",
            )
        report_damage(name, marker.get("damaged"), rep)
        rel = marker.get("data_file", f"shards/{name}.parquet")
        try:
            data = _read_bytes(ds, rel)
        except FileNotFoundError:
            rep.add(name, f"missing data file {rel} (marker exists)")
            continue
        if len(data) != marker["bytes"] or hashlib.sha256(data).hexdigest() != marker["sha256"]:
            rep.add(name, f"checksum mismatch: {rel} differs from its marker (corrupted or replaced)")
        try:
            table = pq.read_table(pa.BufferReader(data), page_checksum_verification=True)  # every page
            file_meta = read_metadata(table.schema)
        except Exception as e:
            rep.add(name, f"unreadable Parquet: {type(e).__name__}: {e}")
            continue
        if dataset_hash is not None and file_meta.get("config_hash") != dataset_hash:
            rep.add(name, f"data file config_hash {file_meta.get('config_hash')} != dataset.json's {dataset_hash}")
        try:
            check_rows(name, table, marker, rep)
        except Exception as e:
            rep.add(name, f"contract check failed: {type(e).__name__}: {e}")
            continue
        keys = table.column("key").to_pylist()
        hashes[name] = _key_hashes(keys)
        if check_base_keys and name in inputs:
            try:
                check_base(name, inputs[name], keys, marker, input_so, rep)
            except Exception as e:
                rep.add(name, f"base shard not readable for the key check: {type(e).__name__}: {e}")
            if deep_check is not None:
                try:
                    deep_check.check(name, inputs[name], table, input_so, rep)
                except ConfigError as e:
                    rep.add(name, f"--deep: teachers not loadable: {e}")
                    deep_check = None
                except Exception as e:
                    rep.add(name, f"--deep check failed: {type(e).__name__}: {e}")
    check_cross_shard_duplicates(ds, hashes, rep)
    if manifest is None:
        rep.warnings.append(("-", "no manifest.json (job not finished?)"))
    else:
        for name, m in manifest.get("shards", {}).items():
            if name in markers and (
                m.get("sha256") != markers[name].get("sha256") or m.get("n_written") != markers[name].get("n_written")
            ):
                rep.add(name, "manifest entry (checksum / n_written) differs from the marker")
            elif name in markers and "config_hash" in m and m.get("config_hash") != markers[name].get("config_hash"):
                rep.add(name, "manifest entry config_hash differs from the marker")
    return rep


def rejected_reasons(marker: dict) -> Counter:
    return Counter(marker["rejected_by_reason"])


__all__ = ["validate_dataset", "ValidationReport", "Rejected", "check_marker"]
