"""Synthetic corpus generation and base-shard readers (tar + Parquet, local + S3)."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dr_pipeline.corpus.readers import Rejected, Sample, ShardReadError, expand_urls, iter_shard, shard_name
from dr_pipeline.corpus.synthetic import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZES, make_corpus, render_scene

N_SHARDS, PER_SHARD = 2, 6


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _records(url: str, storage_options: dict | None = None) -> list[tuple]:
    out = []
    for r in iter_shard(url, storage_options):
        assert isinstance(r, Sample), r
        out.append((r.key, r.image, r.caption, r.url, r.uid))
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    urls = make_corpus(str(root), n_shards=N_SHARDS, per_shard=PER_SHARD, seed=7)
    assert urls == [f"{root}/tar/shard-0000{i}.tar" for i in range(N_SHARDS)] + [
        f"{root}/parquet/shard-0000{i}.parquet" for i in range(N_SHARDS)
    ]
    return root


def _member_names(tar_path: Path) -> list[str]:
    with tarfile.open(tar_path) as t:
        return t.getnames()


# --------------------------------------------------------------------------- synthetic


def test_same_seed_byte_identical_other_seed_differs(corpus, tmp_path):
    again = tmp_path / "again"
    make_corpus(str(again), n_shards=N_SHARDS, per_shard=PER_SHARD, seed=7)
    assert _files(again) == _files(corpus)
    other = tmp_path / "other"
    make_corpus(str(other), n_shards=N_SHARDS, per_shard=PER_SHARD, seed=8)
    a, b = _files(corpus), _files(other)
    assert a.keys() == b.keys()
    assert all(a[k] != b[k] for k in a)


def test_shards_are_independent_of_shard_count(corpus, tmp_path):
    one = tmp_path / "one"
    make_corpus(str(one), n_shards=1, per_shard=PER_SHARD, seed=7, formats=("tar",))
    assert _files(one) == {"tar/shard-00000.tar": (corpus / "tar/shard-00000.tar").read_bytes()}


def test_tar_layout_and_fixed_metadata(corpus):
    names = _member_names(corpus / "tar/shard-00001.tar")
    keys = [f"0000100{i:02d}" for i in range(PER_SHARD)]
    assert names == [f"{k}.{ext}" for k in keys for ext in ("jpg", "txt", "json", "url.txt")]
    with tarfile.open(corpus / "tar/shard-00001.tar") as t:
        assert {(m.mtime, m.uid, m.gid) for m in t.getmembers()} == {(0, 0, 0)}


def test_tar_and_parquet_hold_the_same_samples(corpus):
    for i in range(N_SHARDS):
        tar = _records(str(corpus / f"tar/shard-{i:05d}.tar"))
        par = _records(str(corpus / f"parquet/shard-{i:05d}.parquet"))
        assert len(tar) == PER_SHARD and tar == par
        for key, _, _, url, uid in tar:
            assert key.startswith(f"{i:05d}") and len(key) == 9
            assert len(uid) == 32 and int(uid, 16) >= 0
            assert url == f"https://synthetic.example/{uid}.jpg"
    schema = pq.read_schema(corpus / "parquet/shard-00000.parquet")
    assert schema.field("jpg").type == pa.binary() and schema.field("width").type == pa.int32()


def test_images_decode_with_recorded_size_and_captions_match_labels(corpus):
    sizes, par = set(), iter_shard(str(corpus / "parquet/shard-00000.parquet"))
    for s in iter_shard(str(corpus / "tar/shard-00000.tar")):
        p = next(par)
        img = Image.open(io.BytesIO(s.image))
        assert img.format == "JPEG" and img.mode == "RGB"
        assert img.size == (s.meta["width"], s.meta["height"]) == (p.meta["width"], p.meta["height"])
        assert all(96 <= v <= 320 for v in img.size)
        sizes.add(img.size)
        assert s.meta["key"] == s.key and s.meta["caption"] == s.caption
        label = s.meta["label"]
        assert 1 <= len(label["objects"]) <= 3
        for o in label["objects"]:
            assert o["shape"] in SHAPES and o["colour"] in COLOURS and o["size"] in SIZES
            assert o["position"] in POSITIONS
            assert f"a {o['size']} {o['colour']} {o['shape']}" in s.caption
        assert label["background"] in BACKGROUNDS and label["background_colour"] in s.caption
        assert label["background"] in s.caption and s.caption.endswith("background")
    assert len(sizes) > 1  # aspect ratios vary


def test_render_scene_deterministic_and_consistent():
    a = render_scene(np.random.default_rng(3), 200, 120)
    b = render_scene(np.random.default_rng(3), 200, 120)
    assert a[0].tobytes() == b[0].tobytes() and a[1:] == b[1:]
    for seed in range(40):
        img, caption, attrs = render_scene(np.random.default_rng(seed), 160, 100 + seed)
        assert img.size == (160, 100 + seed) and img.mode == "RGB"
        assert len({o.position for o in attrs.objects}) == len(attrs.objects)
        assert all(o.colour != attrs.background_colour for o in attrs.objects)
        # Every named shape is actually drawn, in its colour.
        pixels = {tuple(p) for p in np.asarray(img).reshape(-1, 3)}
        assert all(COLOURS[o.colour] in pixels for o in attrs.objects), caption


# --------------------------------------------------------------------------- urls


def test_expand_urls_brace_glob_directory(corpus):
    tar = corpus / "tar"
    expected = [str(tar / f"shard-{i:05d}.tar") for i in range(N_SHARDS)]
    assert expand_urls(str(tar / "shard-{00000..00001}.tar")) == expected
    assert expand_urls(str(tar / "*.tar")) == expected
    assert expand_urls(str(tar)) == expected
    # lists are merged, sorted and de-duplicated; braces are not checked for existence
    both = expand_urls([str(corpus / "parquet"), str(tar / "shard-0000[01].tar"), expected[0]])
    assert both == sorted(expected + [str(corpus / f"parquet/shard-{i:05d}.parquet") for i in range(N_SHARDS)])
    assert expand_urls(str(tar / "shard-{00005..00006}.tar")) == [
        str(tar / "shard-00005.tar"),
        str(tar / "shard-00006.tar"),
    ]


def test_expand_urls_nothing_matches_raises(corpus, tmp_path):
    with pytest.raises(ShardReadError, match="nomatch-"):
        expand_urls(str(corpus / "tar/nomatch-*.tar"))
    with pytest.raises(ShardReadError, match="no .tar or .parquet"):
        expand_urls(str(tmp_path))  # an empty directory
    with pytest.raises(ShardReadError, match="no such file"):
        expand_urls(str(tmp_path / "missing-dir"))


def test_shard_name():
    assert shard_name("s3://b/x/shard-00003.tar") == "shard-00003"
    assert shard_name("/data/p/shard-00001.parquet") == "shard-00001"
    assert shard_name("gs://b/00042.tar.gz") == "00042"


# --------------------------------------------------------------------------- s3


def test_s3_roundtrip_equals_local(corpus, s3_bucket):
    bucket, so = s3_bucket
    urls = make_corpus(f"s3://{bucket}/corpus", n_shards=N_SHARDS, per_shard=PER_SHARD, seed=7, storage_options=so)
    tars = [f"s3://{bucket}/corpus/tar/shard-{i:05d}.tar" for i in range(N_SHARDS)]
    assert urls[:N_SHARDS] == tars
    assert expand_urls(f"s3://{bucket}/corpus/tar/*.tar", so) == tars
    assert expand_urls(f"s3://{bucket}/corpus/tar", so) == tars
    assert expand_urls(f"s3://{bucket}/corpus/parquet/", so) == urls[N_SHARDS:]
    for url in urls:
        local = corpus / url.split("/corpus/", 1)[1]
        assert _records(url, so) == _records(str(local))
    with pytest.raises(ShardReadError, match="nope"):
        expand_urls(f"s3://{bucket}/corpus/tar/nope-*.tar", so)


def test_s3_missing_shard_error_names_url_not_secrets(s3_bucket):
    bucket, so = s3_bucket
    so = {**so, "key": "testing", "secret": "very-secret-value"}
    url = f"s3://{bucket}/missing/shard-00000.tar"
    with pytest.raises(ShardReadError) as e:
        list(iter_shard(url, so))
    assert url in str(e.value) and "very-secret-value" not in str(e.value)


# --------------------------------------------------------------------------- bad input


def _tar(path: Path, members: list[tuple[str, bytes]]) -> str:
    with tarfile.open(path, "w") as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return str(path)


def test_truncated_tar_mid_member(corpus, tmp_path):
    src = corpus / "tar/shard-00000.tar"
    raw = src.read_bytes()
    with tarfile.open(src) as t:
        jpg3 = t.getmember("000000003.jpg")
    cut = tmp_path / "cut.tar"
    cut.write_bytes(raw[: jpg3.offset_data + jpg3.size // 2])
    recs = list(iter_shard(str(cut)))
    full = _records(str(src))
    assert [(r.key, r.image, r.caption, r.url, r.uid) for r in recs[:3]] == full[:3]
    assert len(recs) == 4 and isinstance(recs[3], Rejected)
    assert (recs[3].key, recs[3].reason) == ("000000003", "truncated")


def test_truncated_tar_mid_header_distrusts_last_group(corpus, tmp_path):
    # Cut inside the header of sample 3's first member: tarfile just stops, so the last
    # group seen (sample 2) cannot be known complete and is rejected, not emitted.
    src = corpus / "tar/shard-00000.tar"
    with tarfile.open(src) as t:
        jpg3 = t.getmember("000000003.jpg")
    cut = tmp_path / "cut.tar"
    cut.write_bytes(src.read_bytes()[: jpg3.offset + 100])
    recs = list(iter_shard(str(cut)))
    assert [r.key for r in recs] == ["000000000", "000000001", "000000002"]
    assert all(isinstance(r, Sample) for r in recs[:2])
    assert (recs[2].reason, recs[2].key) == ("truncated", "000000002")


def test_bad_tar_records_are_rejected_with_reasons(tmp_path):
    jpg = b"\xff\xd8fake-jpeg"
    url = _tar(
        tmp_path / "bad.tar",
        [
            ("a.jpg", jpg),
            ("a.txt", b"first a"),
            ("b.txt", b"caption only"),
            ("a.jpg", jpg),
            ("a.txt", b"a again"),
            ("../evil.jpg", jpg),
            ("../evil.txt", b"escape"),
            ("/abs.png", jpg),
            ("c.jpg", jpg),
            ("c.txt", b"caf\xe9"),
            ("c.json", b"{not json"),
            ("c.cls", b"7"),
            ("c.url.txt", b"http://x/c.jpg"),
            ("sub/d.webp", b"webp"),
            ("sub/d.png", b"png"),
            ("sub/d.json", json.dumps({"uid": "u-d", "url": "http://x/d", "n": 1}).encode()),
        ],
    )
    recs = list(iter_shard(url))
    got = [(r.key, r.reason if isinstance(r, Rejected) else "ok") for r in recs]
    assert got == [
        ("a", "ok"),
        ("b", "no_image"),
        ("a", "duplicate_key"),
        ("../evil", "bad_member_name"),
        ("/abs", "bad_member_name"),
        ("c", "ok"),
        ("sub%2Fd", "ok"),
    ]  # '/' escaped: readers.escape_key
    a, c, d = recs[0], recs[5], recs[6]
    assert (a.image, a.caption, a.url, a.uid, a.meta) == (jpg, "first a", None, None, {})
    assert c.caption == "caf\ufffd" and c.meta["_caption_decode_error"] is True
    assert "_json_error" in c.meta and c.url == "http://x/c.jpg"
    assert "cls" not in str(c.meta)
    assert (d.image, d.caption, d.url, d.uid, d.meta["n"]) == (b"webp", None, "http://x/d", "u-d", 1)
    assert not (tmp_path.parent / "evil.jpg").exists() and not Path("/abs.png").exists()


def test_unreadable_shards_raise(tmp_path):
    missing = str(tmp_path / "missing.tar")
    with pytest.raises(ShardReadError, match="missing.tar"):
        list(iter_shard(missing))
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is not a tar archive\n" * 40)
    with pytest.raises(ShardReadError, match="not a tar"):
        list(iter_shard(str(junk)))
    with pytest.raises(ShardReadError, match="unsupported"):
        iter_shard(str(tmp_path / "x.zip"))
    junk_pq = tmp_path / "junk.parquet"
    junk_pq.write_bytes(b"nope" * 100)
    with pytest.raises(ShardReadError, match="not a Parquet"):
        list(iter_shard(str(junk_pq)))


def test_empty_tars_yield_nothing(tmp_path):
    zero = tmp_path / "zero.tar"
    zero.write_bytes(b"")
    assert list(iter_shard(str(zero))) == []
    assert list(iter_shard(_tar(tmp_path / "empty.tar", []))) == []


def test_parquet_missing_columns_raise(tmp_path):
    path = tmp_path / "noimg.parquet"
    pq.write_table(pa.table({"key": ["a"], "caption": ["c"]}), path)
    with pytest.raises(ShardReadError) as e:
        list(iter_shard(str(path)))
    assert str(path) in str(e.value) and "jpg" in str(e.value) and "image" in str(e.value)
    path2 = tmp_path / "nokey.parquet"
    pq.write_table(pa.table({"jpg": [b"x"]}), path2)
    with pytest.raises(ShardReadError, match="key"):
        list(iter_shard(str(path2)))


def test_parquet_bad_rows_and_other_layouts(tmp_path):
    path = tmp_path / "rows.parquet"
    pq.write_table(
        pa.table(
            {
                "key": ["a", "b", "a", None, "c"],
                "png": pa.array([b"A", None, b"A2", b"N", b"C"], pa.binary()),
                "txt": ["ta", "tb", "ta2", "tn", "tc"],
                "status": ["success"] * 5,
            }
        ),
        path,
        row_group_size=2,
    )
    recs = list(iter_shard(str(path)))
    got = [(r.key, r.reason if isinstance(r, Rejected) else "ok") for r in recs]
    assert got == [("a", "ok"), ("b", "no_image"), ("a", "duplicate_key"), ("<row 3>", "no_key"), ("c", "ok")]
    a = recs[0]
    assert (a.image, a.caption, a.url, a.uid, a.meta) == (b"A", "ta", None, None, {"status": "success"})
    # Hugging Face Image feature layout: struct<bytes, path>
    hf = tmp_path / "hf.parquet"
    img = pa.array([{"bytes": b"I", "path": "p.jpg"}], pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    pq.write_table(pa.table({"key": ["k"], "image": img, "caption": ["cap"]}), hf)
    (s,) = iter_shard(str(hf))
    assert (s.key, s.image, s.caption) == ("k", b"I", "cap")


def test_readers_stream_and_close(corpus):
    # Abandoning a half-read shard closes it (no dangling file handles on early exit).
    it = iter_shard(str(corpus / "tar/shard-00000.tar"))
    assert next(it).key == "000000000"
    it.close()
    fds_before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        it = iter_shard(str(corpus / "parquet/shard-00000.parquet"))
        next(it)
        it.close()
    assert len(os.listdir("/proc/self/fd")) <= fds_before
