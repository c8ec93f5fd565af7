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
    job = load_job(write_job(d / "job.yaml", input={"urls": f"{d}/corpus/tar/*.tar"}, output={"path": str(d / "ds")},
                             teachers=tiny_ensemble, aug={"n_aug": 1, "size": 64}, captions={"k": 0}))
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
    assert_only_victim(ds, capsys, f"n_read {m['n_read'] + 2} != n_written {m['n_written']} + n_rejected 0",
                       f"the base shard has {m['n_read']} record(s) but the marker says n_read={m['n_read'] + 2}")


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
