"""One zero-shot classifier in the package (``train/evaluate.py::zero_shot_metrics``).

``dr eval``, the trainer's periodic evaluation (and so ``dr reproduce``'s curves) and
``dr bootstrap``'s teacher report all call it; here it gives the same numbers as the three
evaluators it replaced (reproduced below from their last versions) on fixed models.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dr_pipeline.corpus import synthetic

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def zeroshot_images() -> tuple[list[bytes], list[int], list[str]]:
    classes = synthetic.zeroshot_classes()
    images, labels = [], []
    for c in range(len(classes)):
        for j in range(2):
            images.append(synthetic.make_zeroshot_sample(0, c, j)["jpg"])
            labels.append(c)
    return images, labels, [f"{c} {s}" for c, s in classes]


@pytest.fixture(scope="module")
def student():
    """A student that classifies well above chance: the committed syn-vit-a teacher's weights
    in an ``OpenClipStudent`` (the same open_clip model, the student interface)."""
    from safetensors.torch import load_file

    from dr_pipeline.config import load_ensemble
    from dr_pipeline.models.teachers import register_model_configs
    from dr_pipeline.train.config import StudentConfig
    from dr_pipeline.train.students import build_student, resolve_spec

    ens = load_ensemble(str(REPO / "teachers" / "synthetic.yaml"))
    register_model_configs(ens)
    t = ens.teacher("syn-vit-a")
    model = build_student(resolve_spec(StudentConfig(arch=t.model, mean=tuple(t.mean), std=tuple(t.std))))
    model.clip.load_state_dict({k: v.float() for k, v in load_file(ens.resolve(t.pretrained)).items()})
    return model.eval()


def _old_eval_zero_shot(model, img, labels, classes, templates) -> dict:
    """``dr eval``'s former ``zero_shot_metrics(model, img, ...)``: one text batch per class."""
    from dr_pipeline.train.evaluate import embed_texts

    cls = []
    for c in classes:
        e = embed_texts(model, [t.format(c) for t in templates]).mean(0)
        cls.append(e / e.norm())
    logits = img @ torch.stack(cls).T
    y = torch.tensor(list(labels))
    return {
        "top1": float((logits.argmax(1) == y).float().mean()),
        "top5": float((logits.topk(5, dim=1).indices == y.unsqueeze(1)).any(1).float().mean()),
    }


@torch.no_grad()
def _old_reproduce_evalset(model, images, labels, classes, templates) -> dict:
    """``reproduce.EvalSet``'s former zero-shot part (PIL decode, all prompts in one batch)."""
    import io

    from PIL import Image

    from dr_pipeline.augment import center_view
    from dr_pipeline.train.evaluate import embed_texts

    views = torch.stack([center_view(Image.open(io.BytesIO(b)), model.spec.image_size) for b in images])
    img = model.encode_image(views)
    cls = embed_texts(model, [t.format(c) for c in classes for t in templates])
    cls = F.normalize(cls.view(len(classes), len(templates), -1).mean(1), dim=-1)
    pred = (img @ cls.T).argmax(1).tolist()
    pc = [classes[p].split() for p in pred]
    yc = [classes[y].split() for y in labels]
    return {
        "top1": float(np.mean([p == y for p, y in zip(pred, labels)])),
        "colour": float(np.mean([a[0] == b[0] for a, b in zip(pc, yc)])),
        "shape": float(np.mean([a[1] == b[1] for a, b in zip(pc, yc)])),
    }


@torch.no_grad()
def _old_teacher_zeroshot(teacher, images, labels, classes) -> dict:
    """``bootstrap.teacher_zeroshot``'s former body (one prompt batch per class, rounded)."""
    from dr_pipeline.bootstrap import ZS_TEMPLATES, centre_views

    views = torch.from_numpy(centre_views(images, teacher.image_size))
    img = torch.cat([teacher.encode_images(views[i : i + 256]) for i in range(0, len(views), 256)])
    cls = torch.stack(
        [F.normalize(teacher.encode_texts([t.format(c) for t in ZS_TEMPLATES]).mean(0), dim=0) for c in classes]
    )
    pred = (img @ cls.T).argmax(1)
    y = torch.tensor(list(labels))
    pc = [classes[i].split() for i in pred.tolist()]
    yc = [classes[i].split() for i in y.tolist()]
    return {
        "top1": round(float((pred == y).float().mean()), 4),
        "colour": round(float(np.mean([a[0] == b[0] for a, b in zip(pc, yc)])), 4),
        "shape": round(float(np.mean([a[1] == b[1] for a, b in zip(pc, yc)])), 4),
    }


def test_student_zero_shot_matches_the_former_eval_and_reproduce_evaluators(student, zeroshot_images):
    from dr_pipeline.train.evaluate import TEMPLATES, EvalData, embed_images, evaluate_model

    images, labels, classes = zeroshot_images
    templates = TEMPLATES["folder"]
    new = evaluate_model(student, EvalData(tasks={"folder": (images, labels, classes)}))["zeroshot"]["folder"]
    old_eval = _old_eval_zero_shot(student, embed_images(student, images), labels, classes, templates)
    old_repro = _old_reproduce_evalset(student, images, labels, classes, templates)
    assert {k: new[k] for k in old_eval} == old_eval
    # the same counts (float32 vs float64 means of them)
    assert {k: new[k] for k in old_repro} == pytest.approx(old_repro, rel=1e-6)
    assert new["top1"] > 5 / 60 and new["colour"] > 0.5  # a real classifier, not one class for all
    assert new["n"] == len(images) and new["n_classes"] == 60 and new["chance"] == pytest.approx(1 / 60)
    # a second evaluation of the same EvalData reuses its decoded views: same numbers
    ed = EvalData(tasks={"folder": (images, labels, classes)})
    assert evaluate_model(student, ed) == evaluate_model(student, ed)


def test_factors_only_for_colour_shape_class_names():
    from dr_pipeline.train.evaluate import class_factors

    assert class_factors(["red circle", "blue star"]) == ("colour", "shape")
    assert class_factors(["cat", "dog"]) == ()
    assert class_factors(["red cat", "blue star"]) == ()


def test_teacher_zero_shot_matches_the_former_bootstrap_evaluator(zeroshot_images):
    from dr_pipeline.bootstrap import teacher_zeroshot
    from dr_pipeline.config import load_ensemble
    from dr_pipeline.models.teachers import load_teacher

    ens = load_ensemble(str(REPO / "teachers" / "synthetic.yaml"))
    images, labels, classes = zeroshot_images
    for spec in ens.teachers:
        t = load_teacher(spec, ens)
        new = teacher_zeroshot(t, images, labels, classes)
        old = _old_teacher_zeroshot(t, images, labels, classes)
        assert {k: round(new[k], 4) for k in old} == old, spec.id
        assert new["top1"] > 5 / 60  # trained teachers: well above chance


def test_synthetic_shard_tasks_count_the_splits_five_shapes(tmp_path):
    """``dr eval`` on a synthetic split shard: the shape task is over the 5 shapes the splits
    draw (chance 1/5), not all 8 the renderer knows."""
    from dr_pipeline.corpus.synthetic import make_split
    from dr_pipeline.train.evaluate import load_eval_data

    make_split("test", str(tmp_path / "t"), 1, 40, 0, formats=("tar",), per_class=0)
    ed = load_eval_data(str(tmp_path / "t" / "tar"))
    assert ed.tasks["shape"][2] == sorted(synthetic.SPLIT_SHAPES)
    assert ed.tasks["colour"][2] == sorted(synthetic.COLOURS)


def test_several_eval_paths_pool_pairs_and_tasks(tmp_path):
    from dr_pipeline.config import ConfigError
    from dr_pipeline.corpus.synthetic import make_split
    from dr_pipeline.train.evaluate import load_eval_data

    make_split("test", str(tmp_path / "t"), 1, 10, 0, formats=("tar",), per_class=1)
    tar, folder = str(tmp_path / "t" / "tar"), str(tmp_path / "t" / synthetic.ZEROSHOT_DIR)
    both = load_eval_data([folder, tar])
    assert len(both.pairs) == 10 and len(both.tasks["folder"][0]) == 60
    assert set(both.tasks) >= {"folder"} and set(load_eval_data(tar).tasks) == set(both.tasks) - {"folder"}
    with pytest.raises(ConfigError, match="more than one path"):
        load_eval_data([folder, folder])
