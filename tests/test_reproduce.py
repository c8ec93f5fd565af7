"""`make reproduce` at toy scale: bootstrap -> reinforce -> train plain / reinforced -> eval -> results.

The real run (jobs/configs/reproduce.yaml, ~20 min) is far too long for CI; this one uses a few
images and steps and asserts the plumbing: every artifact is written, and the reinforced
student learns from the teacher embeddings *stored* in the Parquet shards (no teacher runs
while students train or are evaluated).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
ENSEMBLE = REPO / "teachers" / "synthetic.yaml"


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from dr_pipeline.bootstrap import BootstrapConfig, bootstrap
    from dr_pipeline.reproduce import CorpusConfig, ReinforceConfig, ReproduceConfig, TrainRuns, reproduce
    from dr_pipeline.train.config import StudentConfig

    root = tmp_path_factory.mktemp("reproduce")
    bootstrap(
        str(ENSEMBLE),
        BootstrapConfig(n_train=32, per_shard=16, clip_steps=3, coca_steps=3, batch_size=16, jobs=1),
        out_dir=str(root / "teachers"),
        evaluate=False,
    )
    cfg = ReproduceConfig(
        out_dir=str(root / "out"),
        results_dir=str(root / "results"),
        seed=0,
        corpus=CorpusConfig(web_shards=2, web_per_shard=12, test_shards=1, test_per_shard=8, zeroshot_per_class=1),
        reinforce=ReinforceConfig(
            teachers=str(root / "teachers" / "synthetic.yaml"),
            n_aug=3,
            k=2,
            aug_size=64,
            executor="local",
            batch_size=8,
            num_cpus=1,
        ),
        train=TrainRuns(
            steps=4,
            batch_size=8,
            eval_every=2,
            seeds=(0, 1),
            ablation_seeds=(0,),
            jobs=1,
            student=StudentConfig(arch="tiny", image_size=32, context_length=32),
        ),
    )
    return cfg, reproduce(cfg)


def test_every_artifact_is_written(toy):
    cfg, res = toy
    out, results = Path(cfg.out_dir), Path(cfg.results_dir)
    assert sorted(p.name for p in (out / "dataset" / "shards").glob("*.parquet")) == [
        "shard-00000.parquet",
        "shard-00001.parquet",
    ]
    png = (results / "accuracy_vs_steps.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    on_disk = json.loads((results / "results.json").read_text())
    assert on_disk["analysis"] == json.loads(json.dumps(res["analysis"]))
    md = (results / "results.md").read_text()
    assert "Steps-to-accuracy ratio" in md and all(f"| {v} |" in md for v in ("plain", "kd", "syn", "full"))
    # 2 seeds for plain and full, 1 for each ablation; evaluations at steps 0, 2, 4
    assert sorted((r["variant"], r["seed"]) for r in res["runs"]) == [
        ("full", 0),
        ("full", 1),
        ("kd", 0),
        ("plain", 0),
        ("plain", 1),
        ("syn", 0),
    ]
    for r in res["runs"]:
        assert [row["step"] for row in r["curve"]] == [0, 2, 4]
        assert all(0.0 <= row["top1"] <= 1.0 and 0.0 <= row["i2t_R@1"] <= 1.0 for row in r["curve"])
        assert Path(r["checkpoint"]).is_file()
    rows = res["analysis"]["variants"]
    assert set(rows) == {"plain", "kd", "syn", "full"} and rows["full"]["seeds"] == [0, 1]
    assert len(rows["plain"]["ratio_per_seed"]) == 2 and all(0 <= r <= 1 for r in rows["plain"]["ratio_per_seed"])
    h = res["analysis"]["headline"]
    assert len(h["ratio_per_seed"]) + h["not_reached"] == 2
    # the same seed trains the same student: two plain seeds differ, the run is reproducible below
    plain = {r["seed"]: r["curve"] for r in res["runs"] if r["variant"] == "plain"}
    assert plain[0] != plain[1]


def _stored_rows(dataset: Path) -> dict[str, dict[str, np.ndarray]]:
    """key -> {teacher: [n_aug, dim] float32 image embeddings}, read straight from the Parquet."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for f in sorted((dataset / "shards").glob("*.parquet")):
        t = pq.read_table(f)
        for name in t.column_names:
            if name.startswith("emb__") and "__image__" in name:
                teacher = name.split("__")[1]
                n_aug, dim = map(int, name.rsplit("_", 1)[1].split("x"))
                raw = np.stack([np.asarray(v, np.uint16) for v in t.column(name).to_pylist()])
                vals = torch.from_numpy(raw.astype(np.int16)).view(torch.bfloat16).float().numpy()
                for key, row in zip(t.column("key").to_pylist(), vals.reshape(len(raw), n_aug, dim)):
                    out.setdefault(key, {})[teacher] = row
    return out


def test_reinforced_student_learns_from_stored_teacher_embeddings(toy, monkeypatch):
    """No teacher or captioner is loaded while a reinforced student trains and is evaluated;
    its batches carry the stored bf16 embeddings of the augmentation whose view it sees; its
    distillation term is the loss of those stored embeddings; the run is a pure function of
    the seed (same curve as in the full run)."""
    import dr_pipeline.models.captioner as captioner
    import dr_pipeline.models.teachers as teachers
    from dr_pipeline import reproduce as rp

    cfg, res = toy

    def refuse(*a, **k):
        raise AssertionError("a teacher model was loaded during student training")

    monkeypatch.setattr(teachers, "load_teacher", refuse)
    monkeypatch.setattr(captioner, "load_captioner", refuse)
    full = next(v for v in cfg.variants if v.name == "full")
    lay = rp.Layout(Path(cfg.out_dir))
    again = rp.run_one((cfg, lay, full, 0))
    first = next(r for r in res["runs"] if (r["variant"], r["seed"]) == ("full", 0))
    assert again["curve"] == first["curve"]

    from dr_pipeline.train.distributed import setup, teardown
    from dr_pipeline.train.loop import Trainer

    stored = _stored_rows(lay.dataset)
    env = setup("cpu")
    try:
        trainer = Trainer(rp._train_config(cfg, lay, full, 0), env)
        batches = rp._Batches(trainer, full, 0, lay, trainer.spec.image_size)
        items = batches._epoch(0)
        keys = list(batches.keys)
        assert set(stored) == set(keys)
        for it in items[:8]:
            match = [
                k
                for k in keys
                if all(
                    any(np.array_equal(it["teachers"][t][0].numpy(), row) for row in stored[k][t]) for t in stored[k]
                )
            ]
            assert match == [it["key"]], "a row's teacher image embeddings are not its own stored rows"
            augs = [
                {j for j, row in enumerate(stored[it["key"]][t]) if np.array_equal(it["teachers"][t][0].numpy(), row)}
                for t in stored[it["key"]]
            ]
            assert set.intersection(*augs), "the teachers' embeddings come from different augmentations"
        batch = next(iter(batches))
        assert set(batch["teachers"]) == {"syn-vit-a", "syn-vit-b"}
        # the distillation part, recomputed from the batch's stored embeddings on the same weights
        with torch.no_grad():
            kinds = trainer.loss_fn.kinds()
            from dr_pipeline.train.loop import KINDS

            text = torch.cat([batch["tokens"][:, KINDS.index(c)] for c in kinds])
            img_f, txt_f, scale = trainer.model(batch["image"], text)
            b = batch["image"].shape[0]
            tch = {t: {"image": v[:, 0], "gt": v[:, 1], "syn": v[:, 2]} for t, v in batch["teachers"].items()}
            ref = trainer.loss_fn(img_f, {c: txt_f[i * b : (i + 1) * b] for i, c in enumerate(kinds)}, scale, tch)
        parts = trainer.train_step(batch)
        kd = [k for k in parts if k.startswith("distill_")]
        assert kd, sorted(parts)
        for k in kd + ["loss"]:
            assert float(parts[k].detach()) == pytest.approx(float(ref[k]), rel=1e-5), k
        assert float(parts["loss"].detach()) > 0
    finally:
        teardown(env)
