"""The training loader: join, replay, choices, skips, sharding, resume state, foreign tars."""

from __future__ import annotations

import dataclasses
import gzip
import io
import os
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from dr_pipeline import augment
from dr_pipeline.config import AugSpec, ConfigError
from dr_pipeline.corpus.readers import Sample, iter_shard
from dr_pipeline.corpus.synthetic import make_corpus
from dr_pipeline.shards.datacompdr import write_datacompdr_tar
from dr_pipeline.shards.parquet_io import ShardWriter, read_shard
from dr_pipeline.shards.schema import layout_from_metadata
from dr_pipeline.train.config import DataConfig, ForeignTeacher
from dr_pipeline.train.data import JoinedDataset, StreamState, TrainStream, fresh_seed, unchunk
from dr_pipeline.train.fake_reinforce import VIEW, image_embedding, make_fake_reinforced, text_embedding
from dr_pipeline.train.sources import choose, plan_data
from dr_pipeline.train.students import tokenize

TEACHERS = [("ta", 8, 70.0), ("tb", 12, 60.0)]
CAPTIONERS = ("c1", "c2")
SPEC = AugSpec(n_aug=3, size=64)
SIZE, CTX, SEED = 48, 32, 7  # student size differs from the generation size on purpose
N_SHARDS, PER_SHARD = 3, 6


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-data")
    make_corpus(str(root / "corpus"), n_shards=N_SHARDS, per_shard=PER_SHARD, seed=0)
    make_fake_reinforced(
        str(root / "corpus" / "tar"), str(root / "ds"), TEACHERS, CAPTIONERS, k=3, aug=SPEC, seed=3, drop_syn=4
    )
    return root


def _cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(**{"reinforced": str(root / "ds"), "num_workers": 0, "worker_chunk": 4, **kw})


def _epoch(cfg: DataConfig, rank=0, world=1, start=StreamState(), workers=0, epochs=1) -> list[dict]:
    ds = JoinedDataset(plan_data(cfg), cfg, SEED, SIZE, CTX, rank, world, start, epochs=epochs)
    if workers == 0:
        items = list(unchunk(iter(ds)))
    else:
        items = list(unchunk(iter(DataLoader(ds, batch_size=None, num_workers=workers, collate_fn=lambda x: x))))
    return [it for it in items if "epoch_end" not in it]


class Truth:
    """Independent view of the data: base samples and reinforcement rows read directly."""

    def __init__(self, root: Path):
        self.base = {
            s.key: s
            for n in range(N_SHARDS)
            for s in iter_shard(str(root / "corpus" / "tar" / f"shard-{n:05d}.tar"))
            if isinstance(s, Sample)
        }
        self.rows = {}
        for n in range(N_SHARDS):
            rows, meta = read_shard(str(root / "ds" / "shards" / f"shard-{n:05d}.parquet"))
            for i, k in enumerate(rows.keys):
                self.rows[k] = (rows, i)

    def check(self, item: dict, size: int = SIZE) -> None:
        key = item["key"]
        rows, i = self.rows[key]
        s = self.base[key]
        a, js = item["aug_index"], item["syn_index"]
        assert 0 <= a < SPEC.n_aug
        img = Image.open(io.BytesIO(s.image))
        params = augment.unpack(rows.aug_params[i])[a]
        # the image is exactly the stored augmentation a, replayed at the student size
        assert torch.equal(item["image"], augment.replay(img, params, size, SPEC))
        pool = [(c, j) for c in CAPTIONERS for j in range(len(rows.syn[c][i]))]
        c, j = pool[js]
        assert item["caption"] == s.caption and item["syn_caption"] == rows.syn[c][i][j]
        assert torch.equal(item["tokens"], tokenize([s.caption, rows.syn[c][i][j]], CTX))
        for t, dim, _ in TEACHERS:
            emb = item["teachers"][t]
            assert torch.equal(emb[0], rows.image_emb[t][i, a].float())
            assert torch.equal(emb[1], rows.text_emb[t][i].float())
            assert torch.equal(emb[2], rows.syn_emb[t][c][i][j].float())
            # ... and those rows really are the teachers' embeddings of this view and these captions
            view = augment.replay(img, params, VIEW, SPEC)
            torch.testing.assert_close(emb[0], image_embedding(t, dim, view), atol=1e-2, rtol=0)
            torch.testing.assert_close(emb[1], text_embedding(t, dim, s.caption), atol=1e-2, rtol=0)
            torch.testing.assert_close(emb[2], text_embedding(t, dim, item["syn_caption"]), atol=1e-2, rtol=0)


@pytest.fixture(scope="module")
def truth(world):
    return Truth(world)


def test_sample_holds_rows_of_replayed_augmentation_and_chosen_captions(world, truth):
    items = _epoch(_cfg(world))
    assert len(items) == N_SHARDS * PER_SHARD and not [it for it in items if "skip" in it]
    for it in items:
        truth.check(it)
        assert it["aug_index"] == choose(SEED, 0, it["key"], SPEC.n_aug, "aug")
    # a row with a dropped synthetic caption (k_i < k) only offers the captions it has
    short = [it for it in items if len(truth.rows[it["key"]][0].syn["c1"][truth.rows[it["key"]][1]]) == 2]
    assert short
    # choices are redrawn per epoch, deterministically
    again = _epoch(_cfg(world), start=StreamState(epoch=1))
    assert [it["key"] for it in again] != [it["key"] for it in items]  # shard order reshuffled
    by_key = {it["key"]: it for it in again}
    assert any(by_key[it["key"]]["aug_index"] != it["aug_index"] for it in items)
    for it in again[:4]:
        truth.check(it)
    assert [(it["aug_index"], it["syn_index"]) for it in _epoch(_cfg(world))] == [
        (it["aug_index"], it["syn_index"]) for it in items
    ]


def test_choice_is_uniform():
    counts = Counter(choose(0, e, f"k{i}", 5, "aug") for e in range(4) for i in range(2000))
    assert set(counts) == set(range(5))
    assert all(abs(c / 8000 - 0.2) < 0.02 for c in counts.values())


def test_parquet_base_corpus_gives_the_same_samples(world):
    via_tar = _epoch(_cfg(world))
    via_parquet = _epoch(_cfg(world, base=str(world / "corpus" / "parquet")))
    assert [it["key"] for it in via_parquet] == [it["key"] for it in via_tar]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(via_tar, via_parquet))


def test_teacher_and_captioner_subset_by_id(world):
    items = _epoch(_cfg(world, teachers=("tb",), captioners=("c2",)))
    assert all(set(it["teachers"]) == {"tb"} for it in items)
    assert all(it["syn_caption"].split()[2:3] == ["c2"] or "c2" in it["syn_caption"] for it in items)
    with pytest.raises(ConfigError, match="not in the reinforced data"):
        plan_data(_cfg(world, teachers=("nope",)))


# --------------------------------------------------------------------------- DataCompDR tars


def _export(world: Path, out: Path, member: str = "npz", poison_key: str | None = None) -> None:
    out.mkdir(exist_ok=True)
    for n in range(N_SHARDS):
        rows, meta = read_shard(str(world / "ds" / "shards" / f"shard-{n:05d}.parquet"))
        path = out / f"shard-{n:05d}.tar"
        with open(path, "wb") as f:
            write_datacompdr_tar(f, rows, meta)
        if member == "npz" and poison_key is None:
            continue
        _rewrite_members(path, member, poison_key)


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('DR_EVIL_MARKER', '/tmp/dr-evil')}",))


def _rewrite_members(path: Path, member: str, poison_key: str | None) -> None:
    """npz -> bf16 pth.gz (as released shards); the poisoned key gets a pickle payload."""
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for m, data in members:
            key, ext = m.name.split(".", 1)
            if ext == "npz" and member == "pth.gz":
                with np.load(io.BytesIO(data)) as z:
                    obj = {k: torch.from_numpy(z[k]).to(torch.bfloat16) for k in z.files}
                buf = io.BytesIO()
                torch.save(_Evil() if key == poison_key else obj, buf)
                data, m = gzip.compress(buf.getvalue()), tarfile.TarInfo(f"{key}.pth.gz")
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))


def _tar_cfg(world: Path, tars: Path, **kw) -> DataConfig:
    return DataConfig(
        reinforced=str(tars),
        base=str(world / "corpus" / "tar"),
        num_workers=0,
        worker_chunk=5,
        foreign_teachers=tuple(ForeignTeacher(t, d, s) for t, d, s in TEACHERS),
        foreign_aug=SPEC,
        **kw,
    )


def test_datacompdr_tars_give_the_same_samples_as_parquet(world, truth, tmp_path):
    _export(world, tmp_path / "npz")
    ref = _epoch(_cfg(world))
    got = _epoch(_tar_cfg(world, tmp_path / "npz"))
    assert [it["key"] for it in got] == [it["key"] for it in ref]
    for a, b in zip(got, ref):
        assert (a["aug_index"], a["syn_index"], a["syn_caption"]) == (b["aug_index"], b["syn_index"], b["syn_caption"])
        assert torch.equal(a["image"], b["image"])
        for t, _, _ in TEACHERS:
            assert torch.equal(a["teachers"][t], b["teachers"][t])
    truth.check(got[0])
    with pytest.raises(ConfigError, match="foreign_teachers"):
        plan_data(DataConfig(reinforced=str(tmp_path / "npz"), base=str(world / "corpus" / "tar")))


def test_released_bf16_pth_gz_loads_safely_and_pickle_is_refused(world, tmp_path, monkeypatch):
    marker = tmp_path / "EXECUTED"
    monkeypatch.setenv("DR_EVIL_MARKER", str(marker))
    _export(world, tmp_path / "pth", member="pth.gz")
    ref = _epoch(_cfg(world))
    got = _epoch(_tar_cfg(world, tmp_path / "pth"))
    assert [it["key"] for it in got] == [it["key"] for it in ref]
    assert all(torch.equal(a["teachers"]["ta"], b["teachers"]["ta"]) for a, b in zip(got, ref))

    first = sorted(k for k in Truth(world).rows if k.startswith("00001"))[2]  # 3rd sample of shard 1
    _export(world, tmp_path / "evil", member="pth.gz", poison_key=first)
    got = _epoch(_tar_cfg(world, tmp_path / "evil"))
    assert not marker.exists()  # the payload never ran
    skipped = Counter(it["skip"] for it in got if "skip" in it)
    assert skipped == {"reinforcement_unreadable": PER_SHARD - 2}  # that sample and the rest of its shard
    assert len([it for it in got if "skip" not in it]) == N_SHARDS * PER_SHARD - (PER_SHARD - 2)


# --------------------------------------------------------------------------- skips


def _damage(world: Path, out: Path) -> dict[str, str]:
    """Copy the dataset; damage shard 0's rows in known ways. Returns key -> expected reason."""
    shutil.copytree(world / "ds", out)
    path = out / "shards" / "shard-00000.parquet"
    rows, meta = read_shard(str(path))
    k = rows.keys
    expected = {
        k[0]: "missing_reinforcement",
        k[1]: "mismatched_image",
        k[2]: "mismatched_caption",
        k[3]: "mismatched_syn_count",
        "ghost": "missing_base",
    }
    keep = [i for i in range(len(rows)) if i != 0]
    sub = dataclasses.replace(
        rows,
        keys=[k[i] for i in keep] + ["ghost"],
        uids=[rows.uids[i] for i in keep] + ["ghost"],
        urls=[rows.urls[i] for i in keep] + [None],
        image_sha256=[rows.image_sha256[i] for i in keep] + ["0" * 64],
        widths=[rows.widths[i] for i in keep] + [10],
        heights=[rows.heights[i] for i in keep] + [10],
        captions=[rows.captions[i] for i in keep] + ["x"],
        aug_params=np.concatenate([rows.aug_params[keep], rows.aug_params[:1]]),
        syn={c: [rows.syn[c][i] for i in keep] + [[]] for c in CAPTIONERS},
        image_emb={t: torch.cat([v[keep], v[:1]]) for t, v in rows.image_emb.items()},
        text_emb={t: torch.cat([v[keep], v[:1]]) for t, v in rows.text_emb.items()},
        syn_emb={t: {c: [d[c][i] for i in keep] + [d[c][0][:0]] for c in CAPTIONERS} for t, d in rows.syn_emb.items()},
    )
    sub.image_sha256[0] = "f" * 64  # row of k[1]
    sub.captions[1] = "a caption the teachers never saw"  # row of k[2]
    sub.syn["c1"][2] = sub.syn["c1"][2][:-1]  # row of k[3]: 1 caption, 2 embeddings... fewer
    w = ShardWriter(str(path), layout_from_metadata(meta), meta)
    w.write(sub)
    w.close()
    return expected


def test_missing_and_mismatched_rows_are_counted_never_misaligned(world, truth, tmp_path):
    expected = _damage(world, tmp_path / "ds")
    (tmp_path / "ds" / "_markers" / "shard-00002.json").unlink()  # uncommitted: not read at all
    cfg = DataConfig(reinforced=str(tmp_path / "ds"), num_workers=0)
    plan = plan_data(cfg)
    assert [p.name for p in plan.pairs] == ["shard-00000", "shard-00001"] and plan.base_only == ("shard-00002",)
    items = _epoch(cfg)
    skips = {it["key"]: it["skip"] for it in items if "skip" in it}
    assert skips == expected
    good = [it for it in items if "skip" not in it]
    assert len(good) == 2 * PER_SHARD - 4
    for it in good:
        truth.check(it)
    stream = TrainStream(plan, cfg, SEED, batch_size=4, image_size=SIZE, context_length=CTX)
    batches = iter(stream)
    for _ in range(2):
        next(batches)
    assert stream.skipped == Counter(expected.values())


def test_no_usable_sample_raises_instead_of_hanging(world, tmp_path):
    make_corpus(str(tmp_path / "other"), n_shards=N_SHARDS, per_shard=PER_SHARD, seed=1, formats=("tar",))
    cfg = DataConfig(reinforced=str(world / "ds"), base=str(tmp_path / "other" / "tar"), num_workers=0)
    stream = TrainStream(plan_data(cfg), cfg, SEED, batch_size=4, image_size=SIZE, context_length=CTX)
    with pytest.raises(RuntimeError, match="no usable sample"):
        next(iter(stream))
    # same keys, other images and captions: every row is refused, 3 epochs in a row
    assert sum(stream.skipped.values()) == 3 * N_SHARDS * PER_SHARD
    assert set(stream.skipped) <= {"mismatched_caption", "mismatched_image"}


# --------------------------------------------------------------------------- sharding and order


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_times_workers_cover_every_sample_once(world, world_size):
    """3 shards; 2 ranks x 2 workers and 4 ranks x 2 workers (more workers than shards)."""
    cfg = _cfg(world)
    per_rank = [_epoch(cfg, rank=r, world=world_size, workers=2) for r in range(world_size)]
    keys = [it["key"] for items in per_rank for it in items]
    assert sorted(keys) == sorted(Truth(world).base) and len(set(keys)) == len(keys)
    assert all(per_rank)
    for r in range(world_size):  # the worker count does not change a rank's sequence
        assert [it["key"] for it in _epoch(cfg, rank=r, world=world_size, workers=0)] == [
            it["key"] for it in per_rank[r]
        ]


@pytest.mark.timeout(120)
def test_order_is_independent_of_worker_count_and_chunk_size(world):
    """Two epochs (chunks continue across the boundary), several worker / chunk layouts."""
    seqs = [
        [
            (it["key"], it["aug_index"], it["pos"])
            for it in _epoch(_cfg(world, worker_chunk=chunk), workers=nw, epochs=2)
        ]
        for nw, chunk in [(0, 1), (2, 4), (2, 7)]
    ]
    assert len(seqs[0]) == 2 * N_SHARDS * PER_SHARD and seqs[0] == seqs[1] == seqs[2]


@pytest.mark.timeout(120)
def test_resampled_mode_feeds_every_rank_of_a_large_world(world):
    cfg = _cfg(world, resampled=True)
    plan = plan_data(cfg)
    for rank in (0, 7):
        stream = iter(
            TrainStream(plan, cfg, SEED, batch_size=4, image_size=SIZE, context_length=CTX, rank=rank, world=16)
        )
        batches = [next(stream)[0]["keys"] for _ in range(12)]  # > one pass over the data
        assert len({k for b in batches for k in b}) > PER_SHARD


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kw", [{}, {"augmentation": "fresh", "cache_images": True}], ids=["stored", "fresh"])
def test_stream_state_restarts_exactly_after_the_last_batch(world, kw):
    cfg = _cfg(world, **kw)
    plan = plan_data(cfg)
    full = iter(TrainStream(plan, cfg, SEED, batch_size=5, image_size=SIZE, context_length=CTX))
    seen = [next(full) for _ in range(6)]  # 30 samples: crosses an epoch boundary (18 / epoch)
    assert all((b["teachers"] == {}) == bool(kw) for b, _ in seen)  # fresh views carry no teachers
    state = seen[3][1]
    resumed = iter(
        TrainStream(
            plan,
            dataclasses.replace(cfg, num_workers=2),
            SEED,
            batch_size=5,
            image_size=SIZE,
            context_length=CTX,
            state=state,
        )
    )
    for want, want_state in seen[4:]:
        got, got_state = next(resumed)
        assert got["keys"] == want["keys"] and got_state == want_state
        assert torch.equal(got["image"], want["image"]) and torch.equal(got["tokens"], want["tokens"])
        assert got["teachers"].keys() == want["teachers"].keys()
        assert all(torch.equal(got["teachers"][t], want["teachers"][t]) for t in want["teachers"])


# --------------------------------------------------------------------------- parity with Apple's trainer


def _per_key_layout(
    src: Path, out: Path, member: str = "npz", drop: str | None = None, bad_sha_key: str | None = None
) -> None:
    """Rewrite exported tars into Apple's per-key layout: ``text_emb`` [1, D] (GT only) plus
    ``<syn key>_emb`` [k, D] per synthetic key; ``member="pth.gz"``: bf16 tensors, as released.
    ``drop``: leave that ``*_emb`` array out; ``bad_sha_key``: that sample's json sha256 is wrong."""
    import json

    out.mkdir(exist_ok=True)
    for path in sorted(src.glob("*.tar")):
        with tarfile.open(path) as tar:
            members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
        with tarfile.open(out / path.name, "w", format=tarfile.USTAR_FORMAT) as tar:
            for name, data in members:
                key, ext = name.split(".", 1)
                if ext == "npz":
                    with np.load(io.BytesIO(data)) as z:
                        a = {k: z[k] for k in z.files}
                    arrays = {
                        "image_emb": a["image_emb"],
                        "text_emb": a["text_emb"][:1],
                        "syn_text_emb": a["text_emb"][1:],
                    }
                    arrays.update(
                        {
                            f"syn_text_{k[len('syn_text_emb_') :]}_emb": v
                            for k, v in a.items()
                            if k.startswith("syn_text_emb_")
                        }
                    )
                    arrays.pop(drop, None)
                    buf = io.BytesIO()
                    if member == "npz":
                        np.savez(buf, **arrays)
                    else:
                        torch.save({k: torch.from_numpy(v).to(torch.bfloat16) for k, v in arrays.items()}, buf)
                    data = buf.getvalue() if member == "npz" else gzip.compress(buf.getvalue())
                    name = f"{key}.{member}"
                if ext == "json" and key == bad_sha_key:
                    meta = json.loads(data)
                    data = json.dumps({**meta, "sha256": "0" * 64}).encode()
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("member", ["npz", "pth.gz"])
def test_apple_per_key_layout_gives_the_same_samples_as_parquet(world, truth, tmp_path, member):
    _export(world, tmp_path / "v1")
    _per_key_layout(tmp_path / "v1", tmp_path / "v2", member)
    with tarfile.open(tmp_path / "v2" / "shard-00000.tar") as tar:
        names = {m.name.split(".", 1)[1] for m in tar.getmembers()}
        arrays = _members_arrays(tar, member)
    assert member in names and arrays["text_emb"].shape[0] == 1 and {"syn_text_emb", "syn_text_c2_emb"} <= set(arrays)
    ref = _epoch(_cfg(world))
    got = _epoch(_tar_cfg(world, tmp_path / "v2"))
    assert not [it for it in got if "skip" in it]
    assert [(it["key"], it["aug_index"], it["syn_index"], it["syn_caption"]) for it in got] == [
        (it["key"], it["aug_index"], it["syn_index"], it["syn_caption"]) for it in ref
    ]
    for a, b in zip(got, ref):
        assert torch.equal(a["image"], b["image"])
        for t, _, _ in TEACHERS:
            assert torch.equal(a["teachers"][t], b["teachers"][t])
    for it in got[:4]:
        truth.check(it)
    # Apple's DFNDR selector: only the key that matches, here the second captioner's
    only_c2 = _epoch(_tar_cfg(world, tmp_path / "v2", syn_key_regex="^syn_text_c2$"))
    assert only_c2 and all("c2" in it["syn_caption"] for it in only_c2)
    # a selected key without its embeddings is counted, never trained on with wrong rows
    _per_key_layout(tmp_path / "v1", tmp_path / "v2-missing", member, drop="syn_text_c2_emb")
    skipped = Counter(it.get("skip") for it in _epoch(_tar_cfg(world, tmp_path / "v2-missing")))
    assert set(skipped) == {"missing_syn_emb"}
    assert not [
        it for it in _epoch(_tar_cfg(world, tmp_path / "v2-missing", syn_key_regex="^syn_text$")) if "skip" in it
    ]


def _members_arrays(tar: tarfile.TarFile, member: str) -> dict:
    m = next(m for m in tar.getmembers() if m.name.endswith("." + member))
    data = tar.extractfile(m).read()
    if member == "npz":
        with np.load(io.BytesIO(data)) as z:
            return {k: z[k] for k in z.files}
    return torch.load(io.BytesIO(gzip.decompress(data)), weights_only=True)


def test_datacompdr_base_image_sha256_mismatch_is_skipped_and_counted(world, tmp_path):
    _export(world, tmp_path / "v1")
    victim = sorted(Truth(world).rows)[4]
    _per_key_layout(tmp_path / "v1", tmp_path / "v2", bad_sha_key=victim)
    items = _epoch(_tar_cfg(world, tmp_path / "v2"))
    assert {it["key"]: it["skip"] for it in items if "skip" in it} == {victim: "mismatched_image"}
    assert len([it for it in items if "skip" not in it]) == N_SHARDS * PER_SHARD - 1
    lax = _epoch(_tar_cfg(world, tmp_path / "v2", verify_sha256=False))
    assert not [it for it in lax if "skip" in it]


def _sig(items: list[dict]) -> list[tuple]:
    """What a sample trains on, comparable: key, choices, captions, image and embedding bytes."""
    return [
        (
            it["key"],
            it["aug_index"],
            it["syn_index"],
            it["caption"],
            it["syn_caption"],
            it["image"].numpy().tobytes(),
            tuple(it["teachers"][t].numpy().tobytes() for t in sorted(it["teachers"])),
        )
        for it in items
    ]


def test_syn_key_regex_selects_parquet_captioners(world):
    items = _epoch(_cfg(world, syn_key_regex="^c2$"))
    assert items and all("c2" in it["syn_caption"] for it in items)
    assert _sig(_epoch(_cfg(world, syn_key_regex="^c2$"))) == _sig(_epoch(_cfg(world, captioners=("c2",))))
    with pytest.raises(ConfigError, match="matches none"):
        plan_data(_cfg(world, syn_key_regex="^nope$"))
    with pytest.raises(ConfigError, match="not a regular expression"):
        _cfg(world, syn_key_regex="(")


def test_sample_sequential_walks_augmentations_and_captions_in_order(world, truth):
    cfg = _cfg(world, sample_sequential=True)
    epochs = [{it["key"]: it for it in _epoch(cfg, start=StreamState(epoch=e))} for e in range(4)]
    for key in epochs[0]:
        rows, i = truth.rows[key]
        sizes = [len(rows.syn[c][i]) for c in CAPTIONERS]
        for e, by_key in enumerate(epochs):
            it = by_key[key]
            assert it["aug_index"] == e % SPEC.n_aug  # Apple: epoch % N_aug
            p = 0 if it["syn_index"] < sizes[0] else 1  # the key drawn for this visit
            assert it["syn_index"] - sum(sizes[:p]) == e % sizes[p]  # caption epoch % k of that key
            truth.check(it)


def test_mix_synthetic_ratio_puts_one_caption_per_sample(world, truth):
    ref = _epoch(_cfg(world))
    assert _sig(_epoch(_cfg(world, mix_synthetic_ratio=0.0))) == _sig(ref)
    for it in _epoch(_cfg(world, mix_synthetic_ratio=1.0)):  # always the synthetic caption
        assert it["caption"] == it["syn_caption"] and torch.equal(it["tokens"][0], it["tokens"][1])
        for t, _, _ in TEACHERS:
            assert torch.equal(it["teachers"][t][1], it["teachers"][t][2])
    half = _epoch(_cfg(world, mix_synthetic_ratio=0.5))
    mixed = [it["caption"] == it["syn_caption"] for it in half]
    assert 0 < sum(mixed) < len(mixed)
    for it, r in zip(half, ref):  # same views and captions drawn
        assert (it["key"], it["aug_index"], it["syn_caption"]) == (r["key"], r["aug_index"], r["syn_caption"])
    with pytest.raises(ConfigError, match="mix_synthetic_ratio"):
        _cfg(world, mix_synthetic_ratio=1.5)


def test_several_sources_with_upsampling_factors(world, truth, tmp_path):
    from dr_pipeline.train.config import SourceConfig
    from dr_pipeline.train.data import epoch_visits

    _export(world, tmp_path / "tars")
    extra = SourceConfig(reinforced=str(tmp_path / "tars"), base=str(world / "corpus" / "tar"), upsampling_factor=2.0)
    cfg = _cfg(
        world,
        extra_sources=(extra,),
        foreign_teachers=tuple(ForeignTeacher(t, d, s) for t, d, s in TEACHERS),
        foreign_aug=SPEC,
    )
    plan = plan_data(cfg)
    assert [(p.source, p.kind) for p in plan.pairs] == [(0, "parquet")] * N_SHARDS + [(1, "datacompdr")] * N_SHARDS
    visits = Counter((p.source, p.visit) for p in epoch_visits(plan, SEED, 0))
    assert visits == {(0, 0): N_SHARDS, (1, 0): N_SHARDS, (1, 1): N_SHARDS}
    items = _epoch(cfg)
    assert len(items) == 3 * N_SHARDS * PER_SHARD and not [it for it in items if "skip" in it]
    assert Counter(Counter(it["key"] for it in items).values()) == {3: N_SHARDS * PER_SHARD}
    for it in items[::7]:
        truth.check(it)
    # the second visit of a shard draws its own views
    by_key: dict[str, list[int]] = {}
    for it in items:
        by_key.setdefault(it["key"], []).append(it["aug_index"])
    assert any(len(set(a)) > 1 for a in by_key.values())
    # fractional factors: floor(f) visits plus one with probability f - floor(f); resampled: weights
    half = plan_data(
        _cfg(
            world,
            extra_sources=(dataclasses.replace(extra, upsampling_factor=0.5),),
            foreign_teachers=cfg.foreign_teachers,
            foreign_aug=SPEC,
        )
    )
    n = [sum(p.source == 1 for p in epoch_visits(half, SEED, e)) for e in range(200)]
    assert sum(n) / len(n) == pytest.approx(0.5 * N_SHARDS, rel=0.15)
    from dr_pipeline.train.data import rank_shards

    drawn = [
        p.source
        for e in range(100)
        for p in rank_shards(plan, dataclasses.replace(cfg, resampled=True), SEED, e, 0, 1)[0]
    ]
    assert Counter(drawn)[1] / len(drawn) == pytest.approx(2 / 3, abs=0.08)
    with pytest.raises(ConfigError, match="upsampling_factor"):
        SourceConfig(reinforced="x", upsampling_factor=0)


def test_cache_images_gives_the_same_samples_and_skips(world, tmp_path):
    """data.cache_images: decoded once (prefilled before the workers fork), identical batches."""
    expected = _damage(world, tmp_path / "ds")
    plain, cached = (
        DataConfig(reinforced=str(tmp_path / "ds"), num_workers=0, worker_chunk=4, cache_images=c)
        for c in (False, True)
    )
    assert _sig([it for it in _epoch(cached) if "skip" not in it]) == _sig(
        [it for it in _epoch(plain) if "skip" not in it]
    )
    assert {it["key"]: it["skip"] for it in _epoch(cached) if "skip" in it} == expected
    plan = plan_data(plain)
    ts = [
        TrainStream(
            plan, dataclasses.replace(c, num_workers=2), SEED, batch_size=5, image_size=SIZE, context_length=CTX
        )
        for c in (plain, cached)
    ]
    assert ts[0].cache is None and set(ts[1].cache.shards) == {p.base_url for p in plan.pairs}
    streams = [iter(t) for t in ts]
    for _ in range(5):  # 25 samples: across an epoch boundary
        (a, sa), (b, sb) = next(streams[0]), next(streams[1])
        assert a["keys"] == b["keys"] and sa == sb and torch.equal(a["image"], b["image"])


# --------------------------------------------------------------------------- fresh augmentation


def _fresh_image(truth: Truth, key: str, epoch: int, visit: int = 0) -> torch.Tensor:
    """The view ``data.augmentation: fresh`` must give: new params from the reinforcement's
    sampler and spec, keyed by (seed, epoch, visit, key), replayed at the student size."""
    img = Image.open(io.BytesIO(truth.base[key].image))
    p = augment.sample_params(SPEC, fresh_seed(SEED, epoch, visit), key, 0, img.width, img.height)
    return augment.replay(img, p, SIZE, SPEC)


def _stored_images(truth: Truth, key: str) -> list[torch.Tensor]:
    rows, i = truth.rows[key]
    img = Image.open(io.BytesIO(truth.base[key].image))
    return [augment.replay(img, p, SIZE, SPEC) for p in augment.unpack(rows.aug_params[i])]


def test_fresh_augmentation_draws_new_params_every_epoch_without_teacher_embeddings(world, truth):
    cfg = _cfg(world, augmentation="fresh")
    e0, e1 = _epoch(cfg), _epoch(cfg, start=StreamState(epoch=1))
    assert len(e0) == N_SHARDS * PER_SHARD and not [it for it in e0 + e1 if "skip" in it]
    for e, items in ((0, e0), (1, e1)):
        for it in items:
            assert torch.equal(it["image"], _fresh_image(truth, it["key"], e))
            assert it["teachers"] == {} and it["aug_index"] == -1
    by_key = {it["key"]: it for it in e1}
    # the same sample, another epoch: other params, another view
    assert sum(not torch.equal(it["image"], by_key[it["key"]]["image"]) for it in e0) >= len(e0) - 1
    # ... and not one of the stored views (the reinforcement's draws)
    assert sum(any(torch.equal(it["image"], s) for s in _stored_images(truth, it["key"])) for it in e0) <= 1
    # the same (seed, epoch): the same views, whatever the worker count
    again = _epoch(cfg, workers=2)
    assert [it["key"] for it in again] == [it["key"] for it in e0]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(again, e0))
    # another seed: other views
    other = JoinedDataset(plan_data(cfg), cfg, SEED + 1, SIZE, CTX, epochs=1)
    other_items = {it["key"]: it for it in unchunk(iter(other)) if "key" in it and "image" in it}
    assert sum(not torch.equal(it["image"], other_items[it["key"]]["image"]) for it in e0) >= len(e0) - 1
    # captions are drawn as in stored mode (they do not depend on the view)
    stored = {it["key"]: it for it in _epoch(_cfg(world))}
    assert all(
        (it["caption"], it["syn_caption"], it["syn_index"])
        == (stored[it["key"]]["caption"], stored[it["key"]]["syn_caption"], stored[it["key"]]["syn_index"])
        for it in e0
    )


def test_fresh_augmentation_of_an_upsampled_source_draws_per_visit(world, truth):
    """Two copies of a shard in one epoch are two visits: each its own fresh view."""
    cfg = _cfg(world, augmentation="fresh", upsampling_factor=2.0)
    items = _epoch(cfg)
    assert len(items) == 2 * N_SHARDS * PER_SHARD
    views = {}
    for it in items:
        visits = views.setdefault(it["key"], [])
        visits.append(it["image"])
    for key, imgs in views.items():
        assert len(imgs) == 2
        got = {v: _fresh_image(truth, key, 0, v) for v in (0, 1)}
        assert all(any(torch.equal(img, g) for g in got.values()) for img in imgs)
    assert sum(not torch.equal(a, b) for a, b in views.values()) >= len(views) - 1


def test_fresh_augmentation_with_distillation_is_refused():
    from dr_pipeline.train.config import LossConfig, TrainConfig

    data = DataConfig(reinforced="ds", augmentation="fresh")
    with pytest.raises(ConfigError, match=r"fresh views have no teacher embeddings.*loss\.lam: 0 \(got 1\.0\)"):
        TrainConfig(out_dir="o", data=data, steps=1, batch_size=2)  # loss.lam defaults to 1
    with pytest.raises(ConfigError, match="loss.lam: 0"):
        TrainConfig(out_dir="o", data=data, steps=1, batch_size=2, loss=LossConfig(lam=0.5))
    ok = TrainConfig(out_dir="o", data=data, steps=1, batch_size=2, loss=LossConfig(lam=0.0, syn_weight=1.0))
    assert ok.data.augmentation == "fresh"
    assert DataConfig(reinforced="ds").augmentation == "stored"
    with pytest.raises(ConfigError, match="data.augmentation must be one of stored, fresh, center"):
        DataConfig(reinforced="ds", augmentation="online")


@pytest.mark.parametrize("cache", [False, True])
def test_base_corpus_alone_with_centre_views(world, cache):
    """``reinforced: null``: every base record of every shard once an epoch, in shard order
    within a shard, its own caption in both caption slots, the centre view, no teachers."""
    base = {
        s.key: s
        for n in range(N_SHARDS)
        for s in iter_shard(str(world / "corpus" / "tar" / f"shard-{n:05d}.tar"))
        if isinstance(s, Sample)
    }
    cfg = DataConfig(
        reinforced=None,
        base=str(world / "corpus" / "tar" / "*.tar"),
        augmentation="center",
        cache_images=cache,
        num_workers=0,
        worker_chunk=4,
    )
    plan = plan_data(cfg)
    assert plan.teachers == () and len(plan.pairs) == N_SHARDS
    items = _epoch(cfg, epochs=2)
    assert not [it for it in items if "skip" in it]
    first, second = items[: len(items) // 2], items[len(items) // 2 :]
    assert sorted(it["key"] for it in first) == sorted(base) == sorted(it["key"] for it in second)
    for run in (first, second):  # records of a shard stay consecutive and in order
        keys = [it["key"] for it in run]
        for n in range(N_SHARDS):
            own = [k for k in keys if k.startswith(f"{n:05d}")]
            i = keys.index(own[0])
            assert keys[i : i + PER_SHARD] == sorted(own)
    for it in items:
        rec = base[it["key"]]
        want = augment.center_view(Image.open(io.BytesIO(rec.image)), SIZE)
        assert torch.equal(it["image"], want)
        assert torch.equal(it["tokens"], tokenize([rec.caption, rec.caption], CTX))
        assert it["teachers"] == {} and it["aug_index"] == -1 and it["syn_caption"] == rec.caption
    fresh = dataclasses.replace(cfg, augmentation="fresh")
    views = {it["key"]: it["image"] for it in _epoch(fresh)}
    assert all(v.shape == (3, SIZE, SIZE) for v in views.values())
    assert sum(not torch.equal(views[it["key"]], it["image"]) for it in first) >= len(first) - 1


def test_base_corpus_alone_is_checked():
    from dr_pipeline.train.config import LossConfig, TrainConfig

    with pytest.raises(ConfigError, match="data.base is required"):
        DataConfig(reinforced=None, augmentation="center")
    with pytest.raises(ConfigError, match="no stored views"):
        DataConfig(reinforced=None, base="b/*.tar")
    with pytest.raises(ConfigError, match="no teachers"):
        DataConfig(reinforced=None, base="b/*.tar", augmentation="fresh", teachers=("ta",))
    data = DataConfig(reinforced=None, base="b/*.tar", augmentation="center")
    with pytest.raises(ConfigError, match="center views have no teacher embeddings"):
        TrainConfig(out_dir="o", data=data, steps=1, batch_size=2)
    TrainConfig(out_dir="o", data=data, steps=1, batch_size=2, loss=LossConfig(lam=0.0))


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_are_the_slot_stream_cut_in_batch_sizes(world, tmp_path, workers):
    """TrainStream cuts its batches straight from the workers' chunks (``_join``): with skips
    inside chunks and batches spanning chunks, every field equals the per-slot stream's
    samples taken batch_size at a time."""
    _damage(world, tmp_path / "ds")
    cfg = DataConfig(reinforced=str(tmp_path / "ds"), num_workers=workers, worker_chunk=3)
    samples = [it for it in _epoch(cfg, epochs=2) if "skip" not in it]
    stream = iter(TrainStream(plan_data(cfg), cfg, SEED, batch_size=5, image_size=SIZE, context_length=CTX))
    for b in range(len(samples) // 5):
        batch, state = next(stream)
        want = samples[5 * b : 5 * b + 5]
        assert batch["keys"] == [it["key"] for it in want]
        assert state == StreamState(*want[-1]["pos"][:2], want[-1]["pos"][2] + 1)
        assert torch.equal(batch["image"], torch.stack([it["image"] for it in want]))
        assert torch.equal(batch["tokens"], torch.stack([it["tokens"] for it in want]))
        assert batch["tokens"].dtype == torch.long and batch["aug_index"].dtype == torch.long
        assert batch["aug_index"].tolist() == [it["aug_index"] for it in want]
        assert batch["syn_index"].tolist() == [it["syn_index"] for it in want]
        for field, name in (("captions", "caption"), ("syn_captions", "syn_caption"), ("shards", "shard")):
            assert batch[field] == [it[name] for it in want]
        assert batch["teachers"].keys() == want[0]["teachers"].keys() != set()
        for t in want[0]["teachers"]:
            assert batch["teachers"][t].dtype == torch.float32
            assert torch.equal(batch["teachers"][t], torch.stack([it["teachers"][t] for it in want]))
