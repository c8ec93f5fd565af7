"""`dr validate` catches corruption after the fact, names the shard, exits non-zero."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dr_pipeline.cli import main as dr
from dr_pipeline.config import load_job
from dr_pipeline.corpus.synthetic import make_corpus
from dr_pipeline.execute.runner import resolve_ensemble, run_job
from tests.conftest import write_job

pytestmark = pytest.mark.timeout(180)
VICTIM = "shard-00001"


@pytest.fixture(scope="module")
def clean(tmp_path_factory, tiny_ensemble) -> Path:
    """A small committed dataset: 3 shards x 3 samples (local executor, no captions)."""
    d = tmp_path_factory.mktemp("validate")
    make_corpus(str(d / "corpus"), n_shards=3, per_shard=3, seed=2, formats=("tar",))
    job = load_job(
        write_job(
            d / "job.yaml",
            input={"urls": f"{d}/corpus/tar/*.tar"},
            output={"path": str(d / "ds")},
            teachers=tiny_ensemble,
            aug={"n_aug": 1, "size": 64},
            captions={"k": 0},
        )
    )
    assert run_job(job, resolve_ensemble(job), executor="local").ok
    return d / "ds"


@pytest.fixture()
def ds(clean, tmp_path) -> Path:
    copy = tmp_path / "ds"
    shutil.copytree(clean, copy)
    return copy


def validate(path: Path, capsys) -> tuple[int, list[str], str]:
    code = dr(["validate", str(path)])
    out = capsys.readouterr().out
    errors = [ln for ln in out.splitlines() if ln.startswith("ERROR")]
    return code, errors, out


def assert_only_victim(path: Path, capsys, *needles: str) -> list[str]:
    code, errors, out = validate(path, capsys)
    assert code == 1, out
    assert errors and all(ln.startswith(f"ERROR   {VICTIM}: ") for ln in errors), out
    for n in needles:
        assert any(n in ln for ln in errors), (n, out)
    assert out.rstrip().endswith(f"FAILED: {len(errors)} problem(s)")
    return errors


def _marker(ds: Path) -> Path:
    return ds / "_markers" / f"{VICTIM}.json"


def _edit_marker(ds: Path, **changes) -> None:
    m = json.loads(_marker(ds).read_text())
    m.update(changes)
    _marker(ds).write_text(json.dumps(m))


def test_clean_dataset_validates(clean, capsys):
    code, errors, out = validate(clean, capsys)
    assert code == 0 and not errors and "3 committed shard(s), 9 samples checked" in out and out.rstrip().endswith("OK")


def test_flipped_byte(ds, capsys):
    f = ds / "shards" / f"{VICTIM}.parquet"
    data = bytearray(f.read_bytes())
    data[len(data) // 3] ^= 0x01
    f.write_bytes(bytes(data))
    assert_only_victim(ds, capsys, "checksum mismatch")


def test_truncated_parquet(ds, capsys):
    f = ds / "shards" / f"{VICTIM}.parquet"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert_only_victim(ds, capsys, "checksum mismatch", "unreadable Parquet")


def test_missing_data_file(ds, capsys):
    (ds / "shards" / f"{VICTIM}.parquet").unlink()
    assert_only_victim(ds, capsys, f"missing data file shards/{VICTIM}.parquet")


def test_missing_shard(ds, capsys):
    (ds / "shards" / f"{VICTIM}.parquet").unlink()
    _marker(ds).unlink()
    assert_only_victim(ds, capsys, "missing: input shard has no committed output shard")


def test_marker_n_written_disagrees_with_rows(ds, capsys):
    m = json.loads(_marker(ds).read_text())
    _edit_marker(ds, n_written=m["n_written"] + 1, n_read=m["n_read"] + 1)
    assert_only_victim(ds, capsys, f"{m['n_written']} rows but the marker says n_written={m['n_written'] + 1}")


def test_marker_n_read_disagrees(ds, capsys):
    m = json.loads(_marker(ds).read_text())
    _edit_marker(ds, n_read=m["n_read"] + 2)
    assert_only_victim(
        ds,
        capsys,
        f"n_read {m['n_read'] + 2} != n_written {m['n_written']} + n_rejected 0",
        f"the base shard has {m['n_read']} record(s) but the marker says n_read={m['n_read'] + 2}",
    )


def test_marker_reasons_disagree(ds, capsys):
    _edit_marker(ds, rejected_by_reason={"undecodable": 1})
    assert_only_victim(ds, capsys, "rejection counts by reason / rejected keys do not add up to n_rejected")


def test_marker_not_json(ds, capsys):
    _marker(ds).write_text('{"n_read": 3, "n_writ')
    assert_only_victim(ds, capsys, f"marker _markers/{VICTIM}.json unreadable")


def test_manifest_disagrees(ds, capsys):
    man = json.loads((ds / "manifest.json").read_text())
    man["shards"][VICTIM]["sha256"] = "0" * 64
    (ds / "manifest.json").write_text(json.dumps(man))
    assert_only_victim(ds, capsys, "manifest entry (checksum / n_written) differs from the marker")


# --------------------------------------------------------------------------- issue 18: corruption that stays readable


def _rewrite(ds: Path, edit) -> None:
    """Edit the victim's table, then rewrite file, marker sha256/bytes and manifest entry to match
    (an attacker or a buggy tool that 'fixes' the checksums)."""
    import pyarrow.parquet as pq

    f = ds / "shards" / f"{VICTIM}.parquet"
    t = pq.read_table(f)
    pq.write_table(edit(t).replace_schema_metadata(t.schema.metadata), f)
    _refresh_checksums(ds)


def _refresh_checksums(ds: Path) -> None:
    import hashlib

    data = (ds / "shards" / f"{VICTIM}.parquet").read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    _edit_marker(ds, sha256=sha, bytes=len(data))
    man = json.loads((ds / "manifest.json").read_text())
    man["shards"][VICTIM].update(sha256=sha, bytes=len(data))
    (ds / "manifest.json").write_text(json.dumps(man))


def _set_column(t, name, values):
    import pyarrow as pa

    i = t.schema.get_field_index(name)
    return t.set_column(i, t.schema.field(i), pa.array(values, t.schema.field(i).type))


def validate_deep(path: Path, capsys) -> tuple[int, list[str], str]:
    code = dr(["validate", str(path), "--deep"])
    out = capsys.readouterr().out
    return code, [ln for ln in out.splitlines() if ln.startswith("ERROR")], out


def test_clean_dataset_validates_deep(clean, capsys):
    code, errors, out = validate_deep(clean, capsys)
    assert code == 0 and not errors and "9 row(s) checked deep" in out, out


def test_swapped_keys_fail_deep(ds, capsys):
    # Old validate: OK (the same keys, each row's embeddings now belong to the other image).
    def swap(t):
        keys = t.column("key").to_pylist()
        keys[0], keys[1] = keys[1], keys[0]
        return _set_column(t, "key", keys)

    _rewrite(ds, swap)
    assert validate(ds, capsys)[0] == 0  # nothing a shallow check can see
    code, errors, out = validate_deep(ds, capsys)
    assert code == 1 and errors and all(f"ERROR   {VICTIM}: --deep" in e for e in errors), out
    assert "image sha256 differs" in out


def test_replaced_caption_fails_deep(ds, capsys):
    _rewrite(ds, lambda t: _set_column(t, "caption", ["a caption nobody wrote"] + t.column("caption").to_pylist()[1:]))
    code, errors, out = validate_deep(ds, capsys)
    assert code == 1 and "caption differs from the base sample's" in out, out


def test_flipped_embedding_bit_fails_deep(ds, capsys):
    # One mantissa bit of one bf16 value (norm still ~1: the shallow check passes), checksums rewritten.
    import numpy as np
    import pyarrow as pa

    def flip(t):
        name = next(c for c in t.column_names if c.startswith("emb__") and "__image__" in c)
        col = t.column(name).combine_chunks()
        flat = (
            col.values.values.to_numpy(zero_copy_only=False).copy()
            if pa.types.is_list(col.values.type)
            else col.values.to_numpy(zero_copy_only=False).copy()
        )
        i = int(np.argmax(np.abs(flat.view(np.int16).astype(np.int32) & 0x7FFF)))  # the largest |value|
        flat[i] ^= 1 << 3  # ~6 % of the value: norm stays within NORM_TOL
        rebuilt = pa.array(flat, pa.uint16())
        if pa.types.is_list(col.values.type):
            inner = pa.FixedSizeListArray.from_arrays(rebuilt, col.values.type.list_size)
            rebuilt = pa.FixedSizeListArray.from_arrays(inner, col.type.list_size)
        else:
            rebuilt = pa.FixedSizeListArray.from_arrays(rebuilt, col.type.list_size)
        i = t.schema.get_field_index(name)
        return t.set_column(i, t.schema.field(i), rebuilt)

    _rewrite(ds, flip)
    assert validate(ds, capsys)[0] == 0
    code, errors, out = validate_deep(ds, capsys)
    assert code == 1 and "image embeddings differ from a recomputation" in out, out


def test_marker_of_another_config(ds, capsys):
    # Old validate: OK for a shard + marker copied from a job with another config.
    _edit_marker(ds, config_hash="0123456789abcdef")
    assert_only_victim(ds, capsys, "marker config_hash 0123456789abcdef != dataset.json's")


def _own_corpus(ds: Path, tmp_path: Path) -> Path:
    """A private copy of the base corpus, and job.yaml pointing at it (so tests may damage it)."""
    import yaml

    job = yaml.safe_load((ds / "job.yaml").read_text())
    src = Path(job["input"]["urls"]).parent
    dst = tmp_path / "corpus"
    shutil.copytree(src, dst)
    job["input"]["urls"] = str(dst / "*.tar")
    (ds / "job.yaml").write_text(yaml.safe_dump(job))
    return dst


def test_damaged_base_shard_is_named(ds, tmp_path, capsys):
    # Old validate: OK (it re-read the base with the same silent reader).
    corpus = _own_corpus(ds, tmp_path)
    base = corpus / f"{VICTIM}.tar"
    base.write_bytes(base.read_bytes() + b"not a tar member " * 64)
    assert_only_victim(ds, capsys, "damaged tar: bytes", "trailing garbage")


def test_damage_recorded_in_the_marker_is_named(ds, capsys):
    _edit_marker(
        ds,
        damaged=[
            {
                "offset": 1024,
                "end": 3072,
                "members_skipped": 1,
                "samples_lost": None,
                "detail": "bad header checksum at byte 1024",
            }
        ],
    )
    assert_only_victim(ds, capsys, "damaged tar: bytes 1024..byte 3072 skipped (1 member(s), samples lost: unknown)")


def test_corpus_index_disagrees(ds, tmp_path, capsys):
    corpus = _own_corpus(ds, tmp_path)
    (corpus / f"{VICTIM}_stats.json").write_text(json.dumps({"count": 6, "successes": 5}))
    assert_only_victim(ds, capsys, f"the corpus index {VICTIM}_stats.json says 5 sample(s) but the base shard yields 3")
