"""Issue 18: damaged tar framing, odd members and keys. Every tar here is written byte by byte
(512-byte ustar headers built in the test), so each damage is exactly the one named.

Reader level (no models): every sample is a record or lies in a reported ``Damaged`` range.
"""

from __future__ import annotations

import gzip
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dr_pipeline.corpus.readers import (
    Damaged,
    Rejected,
    Sample,
    escape_key,
    iter_shard,
    shard_index_count,
    shard_name,
    unescape_shard_name,
)

pytestmark = pytest.mark.timeout(120)
MiB = 1 << 20


# --------------------------------------------------------------------------- a tar, byte by byte


def header(name: str, size: int, typ: bytes = b"0", checksum: bool = True) -> bytes:
    b = bytearray(512)
    raw = name.encode()
    b[0 : len(raw)] = raw
    b[100:108] = b"0000644\0"
    b[108:116] = b"0000000\0"
    b[116:124] = b"0000000\0"
    b[124:136] = f"{size:011o}\0".encode()
    b[136:148] = b"00000000000\0"
    b[156:157] = typ
    b[257:265] = b"ustar\x0000"
    b[148:156] = b" " * 8
    if checksum:
        b[148:156] = f"{sum(b):06o}\0 ".encode()
    return bytes(b)


def member(name: str, data: bytes) -> bytes:
    return header(name, len(data)) + data + bytes(-len(data) % 512)


END = bytes(1024)


def sample(key: str, n: int = 0) -> list[tuple[str, bytes]]:
    return [
        (f"{key}.jpg", b"\xff\xd8 image of " + key.encode() + b"\0" * (300 * n)),
        (f"{key}.txt", f"caption {key}".encode()),
    ]


def tar(members: list[tuple[str, bytes]], end: bool = True) -> bytes:
    return b"".join(member(n, d) for n, d in members) + (END if end else b"")


def keyed(n: int, prefix: str = "k") -> list[tuple[str, bytes]]:
    return [m for i in range(n) for m in sample(f"{prefix}{i}", i)]


def offsets(members: list[tuple[str, bytes]]) -> dict[str, int]:
    out, o = {}, 0
    for name, data in members:
        out[name] = o
        o += 512 + len(data) + (-len(data) % 512)
    return out


def read(tmp_path, raw: bytes, name: str = "x.tar"):
    p = tmp_path / name
    p.write_bytes(raw)
    damaged: list[Damaged] = []
    recs = list(iter_shard(str(p), on_damage=damaged.append))
    return ([r for r in recs if isinstance(r, Sample)], [r for r in recs if isinstance(r, Rejected)], damaged)


def keys(recs) -> list[str]:
    return [r.key for r in recs]


# --------------------------------------------------------------------------- damaged framing


def test_concatenated_tars_are_read_whole(tmp_path):
    # Old reader: 4 of 8 (it stopped at a.tar's end-of-archive marker).
    raw = tar(keyed(4, "a")) + bytes(8192) + tar(keyed(4, "b"))
    ok, rej, dmg = read(tmp_path, raw)
    assert keys(ok) == [f"a{i}" for i in range(4)] + [f"b{i}" for i in range(4)] and not rej
    (d,) = dmg
    assert (d.members_skipped, d.samples_lost) == (0, 0) and "concatenated" in d.detail
    assert d.offset == len(tar(keyed(4, "a"))) - 1024 and d.end == len(tar(keyed(4, "a"))) + 8192


def test_gzipped_concatenation(tmp_path):
    raw = gzip.compress(tar(keyed(2, "a")) + tar(keyed(2, "b")))
    ok, rej, dmg = read(tmp_path, raw, "x.tar.gz")
    assert keys(ok) == ["a0", "a1", "b0", "b1"] and not rej and [d.samples_lost for d in dmg] == [0]


def test_flipped_bit_in_a_header_resyncs(tmp_path):
    # Old reader: 4 of 8 gone. Now: the damaged member's sample is a counted rejection, the rest read.
    ms = keyed(8)
    raw = bytearray(tar(ms))
    at = offsets(ms)["k4.jpg"]
    raw[at + 110] ^= 0x04  # a bit of the uid field: checksum now wrong
    ok, rej, dmg = read(tmp_path, bytes(raw))
    assert keys(ok) == [f"k{i}" for i in range(8) if i != 4]
    assert [(r.key, r.reason) for r in rej] == [("k4", "damaged")]
    (d,) = dmg
    assert d.offset == at and d.end == offsets(ms)["k4.txt"] and d.members_skipped == 1 and d.samples_lost is None
    assert "bad header checksum" in d.detail and "'k4.jpg'" in d.detail


def test_flipped_bit_in_a_name_loses_no_record(tmp_path):
    ms = keyed(6)
    raw = bytearray(tar(ms))
    at = offsets(ms)["k2.jpg"]
    raw[at + 1] ^= 0x01  # 'k2.jpg' -> 'k3.jpg': a lying name, bad checksum
    ok, rej, dmg = read(tmp_path, bytes(raw))
    assert len(ok) + len(rej) == 6 and len(dmg) == 1
    assert ("k2", "damaged") in [(r.key, r.reason) for r in rej]  # its caption is left: rejected, named


def test_zero_block_inserted_mid_archive(tmp_path):
    # Old reader: 3 of 6 gone (it took the zero block for the end).
    ms = keyed(6)
    t = tar(ms)
    at = offsets(ms)["k3.jpg"]
    ok, rej, dmg = read(tmp_path, t[:at] + bytes(512) + t[at:])
    assert keys(ok) == [f"k{i}" for i in range(6)] and not rej
    assert [(d.offset, d.end, d.samples_lost) for d in dmg] == [(at, at + 512, 0)]


def test_zero_block_over_a_header(tmp_path):
    ms = keyed(6)
    raw = bytearray(tar(ms))
    at = offsets(ms)["k3.jpg"]
    raw[at : at + 512] = bytes(512)
    ok, rej, dmg = read(tmp_path, bytes(raw))
    assert keys(ok) == ["k0", "k1", "k2", "k4", "k5"] and [(r.key, r.reason) for r in rej] == [("k3", "damaged")]
    (d,) = dmg
    assert d.end == offsets(ms)["k3.txt"] and d.samples_lost is None and d.members_skipped >= 1


def test_header_declaring_200_mib(tmp_path):
    # Old reader: 3 of 6 gone (it believed the size). A valid checksum, an impossible size.
    ms = keyed(6)
    raw = bytearray(tar(ms))
    at = offsets(ms)["k3.jpg"]
    raw[at : at + 512] = header("k3.jpg", 200 * MiB)
    ok, rej, dmg = read(tmp_path, bytes(raw))
    assert keys(ok) == ["k0", "k1", "k2", "k4", "k5"] and [(r.key, r.reason) for r in rej] == [("k3", "damaged")]
    (d,) = dmg
    assert d.offset == at and d.end == offsets(ms)["k3.txt"] and "declares 209715200 bytes" in d.detail


def test_trailing_garbage_is_reported(tmp_path):
    t = tar(keyed(3))
    ok, rej, dmg = read(tmp_path, t + b"garbage!" * 100)
    assert keys(ok) == ["k0", "k1", "k2"] and not rej
    (d,) = dmg
    assert d.offset == len(t) and d.end is None and d.samples_lost is None and "trailing garbage" in d.detail


def test_garbage_to_the_end_counts_the_rest_lost(tmp_path):
    ms = keyed(4)
    t = tar(ms)
    at = offsets(ms)["k2.jpg"]
    ok, rej, dmg = read(tmp_path, t[:at] + b"\x01" * (len(t) - at))
    assert keys(ok) == ["k0", "k1"] and not rej
    (d,) = dmg
    assert d.offset == at and d.end is None and "the rest of the shard" in d.detail


def test_cut_tars_keep_the_truncated_rule(tmp_path):
    ms = keyed(3)
    t = tar(ms)
    cut = offsets(ms)["k2.jpg"] + 512 + 5  # mid-member
    ok, rej, dmg = read(tmp_path, t[:cut])
    assert keys(ok) == ["k0", "k1"] and [(r.key, r.reason) for r in rej] == [("k2", "truncated")] and not dmg
    ok, rej, dmg = read(tmp_path, tar(ms, end=False))  # no end-of-archive marker
    assert keys(ok) == ["k0", "k1"] and [(r.key, r.reason) for r in rej] == [("k2", "truncated")] and not dmg


def test_gnu_long_names_and_pax_paths(tmp_path):
    long = "d/" + "x" * 150

    def longlink(name: str) -> bytes:
        data = (name + "\0").encode()
        return header("././@LongLink", len(data), b"L") + data.ljust(512, b"\0")

    def pax(name: str) -> bytes:
        body = f"path={name}\n"
        n = len(body) + 4  # "NNN path=...\n": the length counts itself
        rec = f"{n} {body}".encode()
        assert len(rec) == n
        return header("PaxHeaders/x", n, b"x") + rec.ljust(512, b"\0")

    raw = (
        longlink(long + "a.jpg")
        + member("ignored.jpg", b"A")
        + longlink(long + "a.txt")
        + member("i.txt", b"cap a")
        + pax(long + "b.jpg")
        + member("short.jpg", b"B")
        + pax(long + "b.txt")
        + member("short.txt", b"cap b")
        + END
    )
    ok, rej, dmg = read(tmp_path, raw)
    assert not dmg and not rej
    assert [(s.key, s.image, s.caption) for s in ok] == [
        (escape_key(long + "a"), b"A", "cap a"),
        (escape_key(long + "b"), b"B", "cap b"),
    ]


# --------------------------------------------------------------------------- members and keys


def _img(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 12), (200, 10, 10)).save(buf, fmt)
    return buf.getvalue()


def test_every_decodable_extension_is_an_image(tmp_path):
    # Old reader: gif/bmp/tif(f) members were ignored -> no_image.
    exts = {"gif": "GIF", "BMP": "BMP", "tif": "TIFF", "TIFF": "TIFF", "JPEG": "JPEG", "Png": "PNG", "webp": "WEBP"}
    ms = [m for i, (ext, fmt) in enumerate(exts.items()) for m in ((f"s{i}.{ext}", _img(fmt)), (f"s{i}.txt", b"c"))]
    ok, rej, _ = read(tmp_path, tar(ms))
    assert len(ok) == len(exts) and not rej and all(s.image for s in ok)


def test_non_adjacent_members_join_their_sample(tmp_path):
    # Old reader: 4 records (a, b, a=duplicate_key, b=duplicate_key), read != samples in the tar.
    ms = [
        ("a.jpg", b"A"),
        ("b.jpg", b"B"),
        ("c.jpg", b"C"),
        ("a.txt", b"cap a"),
        ("b.txt", b"cap b"),
        ("c.txt", b"cap c"),
        ("a.json", b'{"uid": "ua"}'),
    ]
    ok, rej, _ = read(tmp_path, tar(ms))
    assert [(s.key, s.image, s.caption) for s in ok] == [
        ("a", b"A", "cap a"),
        ("b", b"B", "cap b"),
        ("c", b"C", "cap c"),
    ]
    assert ok[0].uid == "ua" and not rej
    # A second image of a key already complete is still a duplicate sample.
    ok, rej, _ = read(
        tmp_path,
        tar([("a.jpg", b"A"), ("a.txt", b"1"), ("b.jpg", b"B"), ("b.txt", b"2"), ("a.jpg", b"A2"), ("a.txt", b"3")]),
    )
    assert keys(ok) == ["a", "b"] and [(r.key, r.reason) for r in rej] == [("a", "duplicate_key")]


def test_look_behind_is_bounded(tmp_path):
    # A member more than LOOKBEHIND_GROUPS samples after its key's others starts a new (duplicate) sample.
    from dr_pipeline.corpus.readers import LOOKBEHIND_GROUPS

    ms = [("far.jpg", b"F")] + keyed(LOOKBEHIND_GROUPS + 2) + [("far.txt", b"late caption")]
    ok, rej, _ = read(tmp_path, tar(ms))
    assert ok[0].key == "far" and ok[0].caption is None
    assert [(r.key, r.reason) for r in rej] == [("far", "duplicate_key")] and len(ok) == LOOKBEHIND_GROUPS + 3


def test_empty_txt_falls_back_to_the_json_caption(tmp_path):
    # Old reader: an empty txt (present) hid the json caption -> no_caption downstream.
    ms = [
        ("a.jpg", b"A"),
        ("a.txt", b""),
        ("a.json", json.dumps({"caption": "from json"}).encode()),
        ("b.jpg", b"B"),
        ("b.txt", b"  \n"),
        ("b.json", json.dumps({"text": "text field"}).encode()),
        ("c.jpg", b"C"),
        ("c.txt", b"own"),
        ("c.json", json.dumps({"caption": "not used"}).encode()),
    ]
    ok, _, _ = read(tmp_path, tar(ms))
    assert [s.caption for s in ok] == ["from json", "text field", "own"]


def test_empty_parquet_key_is_no_key(tmp_path):
    # Old reader: written with key ''.
    p = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"key": ["", "  ", "ok", "a/b.c"], "jpg": [b"x"] * 4, "caption": ["c"] * 4}), p)
    recs = list(iter_shard(str(p)))
    assert [(r.key, getattr(r, "reason", "ok")) for r in recs] == [
        ("<row 0>", "no_key"),
        ("<row 1>", "no_key"),
        ("ok", "ok"),
        ("a%2Fb%2Ec", "ok"),
    ]


def test_key_escape_rule():
    assert escape_key("000000042") == "000000042"
    assert escape_key("sub/d") == "sub%2Fd" and escape_key("a.b/c") == "a%2Eb%2Fc"
    assert escape_key("50%") == "50%25" and escape_key("tab\there") == "tab%09here"
    assert escape_key(b"caf\xe9".decode("utf-8", "surrogateescape")) == "caf%E9"
    assert escape_key("naïve") == "naïve"
    from urllib.parse import unquote

    for k in ("sub/d", "a.b/c", "50%", "x%2Fy"):
        assert unquote(escape_key(k)) == k
    assert len({escape_key(k) for k in ("a/b", "a%2Fb", "a.b", "a%2Eb")}) == 4


def test_subfolder_keys_are_escaped(tmp_path):
    ok, _, _ = read(tmp_path, tar([("sub/d.jpg", b"D"), ("sub/d.txt", b"c"), ("x.y/e.png", b"E"), ("x.y/e.txt", b"c")]))
    assert keys(ok) == ["sub%2Fd", "x%2Ey%2Fe"]


def test_shard_names_never_start_with_dot_or_underscore():
    assert shard_name("/c/.hid.tar") == "%2Ehid" and shard_name("s3://b/_part-0.tar") == "%5Fpart-0"
    assert shard_name("/c/%x.parquet") == "%25x" and shard_name("/c/shard-00001.tar") == "shard-00001"
    for stem in (".hid", "_part-0", "%x", "plain"):
        assert unescape_shard_name(shard_name(f"/c/{stem}.tar")) == stem


# --------------------------------------------------------------------------- corpus indexes


def test_corpus_index_counts(tmp_path):
    t = tmp_path / "00000.tar"
    t.write_bytes(tar(keyed(3)))
    assert shard_index_count(str(t)) is None
    (tmp_path / "00000_stats.json").write_text(json.dumps({"count": 5, "successes": 4}))
    assert shard_index_count(str(t)) == (4, "00000_stats.json")
    (tmp_path / "00000_stats.json").unlink()
    pq.write_table(
        pa.table({"key": ["0", "1", "2", "3"], "status": ["success", "success", "failed_to_download", "success"]}),
        tmp_path / "00000.parquet",
    )
    assert shard_index_count(str(t)) == (3, "00000.parquet")
    (tmp_path / "00000.parquet").unlink()
    (tmp_path / "00000.idx").write_text("v1.2 3\njpg 0 10 a.jpg\njpg 1 10 b.jpg\njpg 2 10 c.jpg\n")
    assert shard_index_count(str(t)) == (3, "00000.idx")


# --------------------------------------------------------------------------- end to end (local executor)


@pytest.fixture(scope="module")
def odd_run(tmp_path_factory, tiny_ensemble):
    """Shards named `.hid.tar` / `_part-0.tar` / `plain.tar` holding GIF/BMP/TIFF members, keys in
    sub-folders, non-adjacent members and a caption only in the json, reinforced in-process."""
    from dr_pipeline.config import load_job
    from dr_pipeline.execute.runner import resolve_ensemble, run_job
    from tests.conftest import write_job

    d = tmp_path_factory.mktemp("odd")
    (d / "corpus").mkdir()
    plain = [
        ("g.gif", _img("GIF")),
        ("b.BMP", _img("BMP")),
        ("g.txt", b"a gif"),
        ("b.txt", b"a bmp"),
        ("sub/t.tif", _img("TIFF")),
        ("sub/t.txt", b"in a sub-folder"),
        ("j.jpg", _img("JPEG")),
        ("j.txt", b""),
        ("j.json", json.dumps({"caption": "json caption"}).encode()),
    ]
    (d / "corpus" / "plain.tar").write_bytes(tar(plain))
    (d / "corpus" / ".hid.tar").write_bytes(tar([("h.png", _img("PNG")), ("h.txt", b"hidden")]))
    (d / "corpus" / "_part-0.tar").write_bytes(tar([("p.webp", _img("WEBP")), ("p.txt", b"part")]))
    urls = [str(d / "corpus" / n) for n in ("plain.tar", ".hid.tar", "_part-0.tar")]
    job = load_job(
        write_job(
            d / "job.yaml",
            input={"urls": urls},
            output={"path": str(d / "ds")},
            teachers=tiny_ensemble,
            aug={"n_aug": 1, "size": 64},
            captions={"k": 0},
        )
    )
    report = run_job(job, resolve_ensemble(job), executor="local")
    assert report.ok, report
    return d


def test_odd_members_and_names_end_to_end(odd_run):
    ds = odd_run / "ds"
    markers = {p.stem: json.loads(p.read_text()) for p in (ds / "_markers").glob("*.json")}
    assert set(markers) == {"plain", "%2Ehid", "%5Fpart-0"}
    assert markers["%2Ehid"]["input_url"].endswith("/.hid.tar")
    assert all(m["n_rejected"] == 0 for m in markers.values()), markers
    # Old: 0 of the rows were visible to dataset readers (files named `.hid` / `_part-0`).
    table = pq.read_table(str(ds / "shards"))
    assert table.num_rows == 6 and sorted(table.column("key").to_pylist()) == ["b", "g", "h", "j", "p", "sub%2Ft"]
    caps = dict(zip(table.column("key").to_pylist(), table.column("caption").to_pylist()))
    assert caps["j"] == "json caption" and caps["sub%2Ft"] == "in a sub-folder"


def test_export_never_fails_half_way(odd_run, tmp_path, capsys):
    from dr_pipeline.cli import main as dr
    from dr_pipeline.shards.datacompdr import iter_datacompdr_tar

    out = tmp_path / "dcdr"
    assert dr(["export", str(odd_run / "ds"), "--out", str(out)]) == 0
    tars = sorted(p.name for p in out.iterdir())
    assert tars == ["%2Ehid.tar", "%5Fpart-0.tar", "plain.tar"]  # no temporary file left
    assert sorted(r["key"] for r in iter_datacompdr_tar(str(out / "plain.tar"))) == ["b", "g", "j", "sub%2Ft"]
    # A dataset from before the escape rule (a '/' key): refused before anything is written.
    import shutil

    old = tmp_path / "old"
    shutil.copytree(odd_run / "ds", old)
    f = old / "shards" / "plain.parquet"
    t = pq.read_table(f)
    keys = [k.replace("%2F", "/") for k in t.column("key").to_pylist()]
    pq.write_table(
        t.set_column(t.schema.get_field_index("key"), "key", pa.array(keys)).replace_schema_metadata(t.schema.metadata),
        f,
    )
    capsys.readouterr()
    assert dr(["export", str(old), "--out", str(tmp_path / "dcdr2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'sub/t' cannot be a DataCompDR key" in err[0] and "nothing was exported" in err[0]
    assert not (tmp_path / "dcdr2").exists() or not any((tmp_path / "dcdr2").iterdir())


def test_odd_dataset_validates_deep(odd_run, capsys):
    from dr_pipeline.cli import main as dr

    code = dr(["validate", str(odd_run / "ds"), "--deep"])
    out = capsys.readouterr().out
    assert code == 0 and "6 row(s) checked deep" in out and out.rstrip().endswith("OK"), out
