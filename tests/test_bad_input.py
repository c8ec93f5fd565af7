"""The nasty corpus through `dr reinforce` on local Ray: every sample accounted for, by reason."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dr_pipeline import augment
from dr_pipeline.cli import main as dr
from dr_pipeline.config import load_ensemble, load_job
from dr_pipeline.corpus import readers
from dr_pipeline.corpus.readers import MAX_CAPTION_CHARS, Rejected, Sample, iter_shard
from dr_pipeline.images import ImageRejected, decode_image
from dr_pipeline.models.teachers import load_teacher
from dr_pipeline.shards.dataset import ReinforcedDataset
from dr_pipeline.shards.parquet_io import read_shard
from dr_pipeline.storage.folder import Folder
from tests.conftest import write_job
from tests.nasty_corpus import WRITTEN, exif_rotated_jpeg, image_zoo, make_nasty_corpus

ESCAPES = ("escape.jpg", "escape.txt", "nested.jpg", "nested.txt")


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def nasty_run(tmp_path_factory, tiny_ensemble, ray_local):
    """The nasty corpus reinforced once by `dr reinforce` on the session's local Ray."""
    base = tmp_path_factory.mktemp("nasty")
    corpus = make_nasty_corpus(str(base / "corpus"))
    work = base / "cwd"
    work.mkdir()
    cfg = write_job(
        base / "job.yaml",
        input={"urls": corpus.urls},
        output={"path": str(base / "out")},
        teachers=tiny_ensemble,
        aug={"n_aug": 1, "size": 64},
        captions={"k": 1},
        execution={"max_attempts": 3, "batch_size": 16},
    )
    before = _tree(base)
    err = io.StringIO()
    old = os.getcwd()
    os.chdir(work)  # relative paths would land here (they must not)
    try:
        with contextlib.redirect_stderr(err):
            code = dr(["reinforce", "--config", cfg])
    finally:
        os.chdir(old)
    return {
        "corpus": corpus,
        "out": str(base / "out"),
        "base": base,
        "code": code,
        "stderr": err.getvalue(),
        "before": before,
    }


pytestmark = pytest.mark.timeout(300)


# --------------------------------------------------------------------------- the job


def test_job_completes_failed_shards_reported_not_retried(nasty_run):
    assert nasty_run["code"] == 1
    err = nasty_run["stderr"]
    assert "2 shard(s) failed" in err
    lines = err.splitlines()
    assert any(
        "wrong-schema" in ln and "PermanentShardError" in ln and "has type string, expected binary" in ln
        for ln in lines
    ), err
    assert any("does-not-exist" in ln and "PermanentShardError" in ln and "file not found" in ln for ln in lines), err
    assert "done: 6/8 shards committed, 21 samples written, 23 rejected, 2 shard(s) failed" in err
    manifest = Folder(nasty_run["out"]).read_json("manifest.json")
    assert not manifest["complete"] and manifest["n_shards"] == 6 and manifest["n_input_shards"] == 8
    assert {f["shard"]: f["attempts"] for f in manifest["failed"]} == {"wrong-schema": 1, "does-not-exist": 1}


def test_every_sample_accounted_exactly_per_shard(nasty_run):
    corpus, ds = nasty_run["corpus"], ReinforcedDataset(nasty_run["out"])
    markers = ds.markers()
    assert sorted(markers) == sorted(s.name for s in corpus.shards if s.error is None)
    for shard in corpus.shards:
        if shard.error is not None:
            continue
        m = markers[shard.name]
        assert (m.n_read, m.n_written, m.n_rejected) == (shard.n_read, len(shard.written), len(shard.rejected)), (
            shard.name
        )
        assert m.n_read == m.n_written + m.n_rejected
        assert m.rejected_by_reason == shard.rejected_by_reason, shard.name
        assert sorted((k, r) for k, r, _ in m.rejected_keys) == sorted(shard.rejected), shard.name
        rows, _ = read_shard(ds.shard_url(shard.name))
        assert rows.keys == shard.written, shard.name
    assert markers["images"].rejected_by_reason == {"empty_image": 1, "too_large": 1, "too_small": 1, "undecodable": 3}
    assert markers["captions"].rejected_by_reason == {
        "bad_member_name": 4,
        "duplicate_key": 1,
        "no_caption": 3,
        "no_image": 2,
    }
    assert markers["truncated"].rejected_by_reason == {"truncated": 1}
    assert markers["rows"].rejected_by_reason == {
        "duplicate_key": 1,
        "no_caption": 1,
        "no_image": 1,
        "no_key": 1,
        "too_small": 1,
        "undecodable": 1,
    }
    assert markers["empty"].n_read == markers["zero-bytes"].n_read == 0
    details = {k: d for k, _, d in markers["images"].rejected_keys}
    assert "900000000 pixels" in details["bomb"] and "allowed format" in details["postscript"]


def test_handled_samples_are_written_sensibly(nasty_run, tiny_ensemble):
    ds = ReinforcedDataset(nasty_run["out"])
    images, _ = read_shard(ds.shard_url("images"))
    captions, _ = read_shard(ds.shard_url("captions"))
    rows = {k: i for i, k in enumerate(images.keys)}
    # EXIF orientation is not applied: size and params refer to the pixels as stored
    i = rows["exif-rotated"]
    assert (images.widths[i], images.heights[i]) == (48, 32)
    c = {k: captions.captions[i] for i, k in enumerate(captions.keys)}
    assert c["long-caption"] == ("a very long caption " * 100)[:MAX_CAPTION_CHARS].strip()  # 50 KB -> 2,000 chars
    assert c["non-utf8"] == "caf\ufffd au lait \ufffd\ufffd" and c["json-caption"] == "from json"
    assert c["dup-inside"] == "first of two"
    assert all(len(s) == 1 for s in captions.syn["tiny-coca"])  # k=1 synthetic caption each
    for _t, e in images.image_emb.items():
        assert torch.isfinite(e.float()).all()
    # the teachers saw exactly decode_image's pixels (the shared decode), replayed from stored params
    ens = load_ensemble(tiny_ensemble)
    teacher = load_teacher(ens.teachers[0], ens)
    job = load_job(str(nasty_run["base"] / "job.yaml"))
    zoo = {k: data for k, _, data, _ in image_zoo()}
    for key in ("png-rgba", "png-16bit", "jpeg-cmyk", "exif-rotated"):
        i = rows[key]
        img = decode_image(zoo[key])
        assert img.size == (images.widths[i], images.heights[i])
        views = torch.stack(
            [augment.replay(img, p, teacher.image_size, job.aug) for p in augment.unpack(images.aug_params[i])]
        )
        want = teacher.encode_images(views).bfloat16()
        diff = (want.view(torch.uint16).int() - images.image_emb[teacher.id][i].view(torch.uint16).int()).abs()
        assert int(diff.max()) <= 1, key


def test_add_teacher_decodes_nasty_images_like_reinforcement(nasty_run, tiny_ensemble, tmp_path):
    """dr add-teacher goes through the same decode: a copy of teacher a under a new id gets a's embeddings
    for every written sample, RGBA / palette / 16-bit / CMYK / EXIF included."""
    import shutil

    import yaml

    copy = tmp_path / "ds"
    shutil.copytree(nasty_run["out"], copy)
    ens = yaml.safe_load(Path(tiny_ensemble).read_text())
    ens["teachers"] = [{**ens["teachers"][0], "id": "tiny-vit-c"}]
    variant = Path(tiny_ensemble).with_name("nasty-c.yaml")
    variant.write_text(yaml.safe_dump(ens))
    assert dr(["add-teacher", str(copy), "--teachers", str(variant), "--teacher", "tiny-vit-c"]) == 0
    ds = ReinforcedDataset(str(copy))
    n = 0
    for name, _m in ds.markers().items():
        rows, _ = read_shard(ds.shard_url(name))
        a, c = rows.image_emb["tiny-vit-a"], rows.image_emb["tiny-vit-c"]
        assert a.shape == c.shape
        if len(rows):
            assert int((a.view(torch.uint16).int() - c.view(torch.uint16).int()).abs().max()) <= 1, name
        n += len(rows)
    assert n == 21


def test_nothing_written_outside_the_output_and_no_payload_ran(nasty_run):
    base, corpus = nasty_run["base"], nasty_run["corpus"]
    new = _tree(base) - nasty_run["before"]
    assert all(p.startswith("out/") for p in new), sorted(p for p in new if not p.startswith("out/"))
    assert not (base / "cwd").exists() or not any((base / "cwd").iterdir())
    for d in {
        base,
        base.parent,
        Path(corpus.root),
        Path(corpus.root).parent,
        Path.cwd(),
        Path.cwd().parent,
        Path("/tmp"),
    }:
        assert not any((d / e).exists() for e in ESCAPES), d
    assert not Path("/tmp/dr-nasty-absolute.jpg").exists() and not Path("/tmp/dr-nasty-absolute.txt").exists()
    assert not os.path.exists(corpus.sentinel)
    out = _tree(Path(nasty_run["out"]))
    assert {p for p in out if not p.startswith("_tmp/")} == (
        {f"shards/{n}.parquet" for n in ReinforcedDataset(nasty_run["out"]).markers()}
        | {f"_markers/{n}.json" for n in ReinforcedDataset(nasty_run["out"]).markers()}
        | {"job.yaml", "ensemble.yaml", "dataset.json", "manifest.json", "README.md"}
    )


def test_validate_and_inspect_report_reasons_failures_and_cross_shard_duplicates(nasty_run, tmp_path, capsys):
    out = nasty_run["out"]
    assert dr(["validate", out]) == 1
    text = capsys.readouterr().out
    assert "6 committed shard(s), 21 samples checked" in text
    assert "23 rejected: " in text and "undecodable 4" in text and "bad_member_name 4" in text
    errors = [ln for ln in text.splitlines() if ln.startswith("ERROR")]
    assert len(errors) == 2, text
    assert any("does-not-exist: missing" in ln and "file not found" in ln for ln in errors)
    assert any("wrong-schema: missing" in ln and "expected binary" in ln for ln in errors)
    assert "WARNING captions,images: 1 key(s) occur in more than one shard, e.g. 'dup-across'" in text
    assert dr(["inspect", out, "--out", str(tmp_path / "sheet.png"), "--images", "3"]) == 0
    text = capsys.readouterr().out
    assert "rejected: 23" in text and "undecodable 4" in text
    assert "rejected in images: empty_image 1, too_large 1, too_small 1, undecodable 3" in text
    assert "FAILED wrong-schema: PermanentShardError" in text
    with Image.open(tmp_path / "sheet.png") as im:
        assert im.size[1] == 3 * 128


# --------------------------------------------------------------------------- units (no Ray)


def test_decode_image_modes():
    zoo = {k: (data, outcome) for k, _, data, outcome in image_zoo()}
    for key, (data, outcome) in zoo.items():
        try:
            img = decode_image(data)
            got = "decoded"
        except ImageRejected as e:
            got = e.reason
        if outcome in (WRITTEN, "too_small"):
            assert got == "decoded" and img.mode == "RGB", key
        else:
            assert got == outcome, key
    rgba = decode_image(zoo["png-rgba"][0])
    assert rgba.getpixel((0, 5)) == (255, 255, 255)  # alpha 0 column: white, not black
    g16 = decode_image(zoo["png-16bit"][0])
    a = np.asarray(g16)[..., 0].astype(int)
    src = (np.arange(36 * 40, dtype=np.uint32).reshape(36, 40) * 45).astype(np.uint16)
    assert (a == (src >> 8)).all() and a.max() > 200 and a.min() < 5  # scaled, not clipped to white
    assert decode_image(zoo["png-palette"][0]).mode == "RGB"
    assert decode_image(exif_rotated_jpeg()).size == (48, 32)  # stored orientation kept


BOMB_CHILD = """
import sys
from dr_pipeline.memory import peak_rss_bytes
from tests.nasty_corpus import bomb_png
from dr_pipeline.images import ImageRejected, decode_image
data = bomb_png(int(sys.argv[1]), int(sys.argv[2]))
before = peak_rss_bytes() // 1024
try:
    decode_image(data)
    print("decoded")
except ImageRejected as e:
    print(e.reason, len(data), peak_rss_bytes() // 1024 - before)
"""


@pytest.mark.parametrize("size", [(30000, 30000), (9000, 9000)])  # over PIL's own limit / only over ours
def test_bomb_is_refused_before_decoding_with_flat_memory(size):
    # A fresh process, so its peak RSS is not hidden by this one's (decoding would add >= 80 MB).
    out = subprocess.run(
        [sys.executable, "-c", BOMB_CHILD, *map(str, size)],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    ).stdout.split()
    reason, nbytes, grown_kb = out[0], int(out[1]), int(out[2])
    assert reason == "too_large" and nbytes < 200_000
    assert grown_kb < 20 * 1024, f"peak RSS grew {grown_kb // 1024} MB on a bomb"


def test_long_caption_is_cut_and_the_tokenizer_truncates(tiny_ensemble, tmp_path):
    long = "word " * 10_000  # 50 KB
    path = tmp_path / "long.tar"
    with tarfile.open(path, "w") as t:
        for name, data in (("k.jpg", b"\xff\xd8"), ("k.txt", long.encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    (s,) = iter_shard(str(path))
    assert isinstance(s, Sample) and s.meta["_caption_truncated_from"] > 49_000
    assert s.caption == long[:MAX_CAPTION_CHARS].strip()  # cut at 2,000 chars (then stripped)
    ens = load_ensemble(tiny_ensemble)
    for spec in ens.teachers:
        t = load_teacher(spec, ens)
        tokens = t.tokenizer([long])
        assert tokens.shape == (1, spec.context_length)
        full, cut = t.encode_texts([long, s.caption])
        assert torch.equal(full, cut)  # both truncated to the same context


def test_oversized_member_is_rejected_unread(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "MAX_MEMBER_BYTES", 1000)
    path = tmp_path / "big.tar"
    with tarfile.open(path, "w") as t:
        for name, data in (("big.jpg", bytes(5000)), ("big.txt", b"cap"), ("ok.jpg", b"x" * 10), ("ok.txt", b"c")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    recs = list(iter_shard(str(path)))
    assert isinstance(recs[0], Rejected) and (recs[0].key, recs[0].reason) == ("big", "too_large")
    assert "5000 bytes" in recs[0].detail and isinstance(recs[1], Sample)


def test_nasty_corpus_expectations_match_the_readers(tmp_path):
    """The generator's own expectations, reader side (no models): the contract the job test relies on."""
    corpus = make_nasty_corpus(str(tmp_path))
    assert {s.name for s in corpus.shards} == {
        "images",
        "captions",
        "truncated",
        "empty",
        "zero-bytes",
        "rows",
        "wrong-schema",
        "does-not-exist",
    }
    for shard in corpus.shards:
        if shard.error:
            with pytest.raises(readers.PermanentShardError, match=shard.error):
                list(iter_shard(shard.url))
            continue
        keys = [r.key for r in iter_shard(shard.url)]
        assert keys == [c.key for c in shard.cases]
    assert sum(len(s.written) for s in corpus.shards) == 21 and sum(len(s.rejected) for s in corpus.shards) == 23
