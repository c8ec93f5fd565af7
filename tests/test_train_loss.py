"""DistillClipLoss against an independent plain-loop reference, and across two gloo ranks."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from dr_pipeline.train.loss import DistillClipLoss

TEACHERS = {"a": (8, 70.0), "b": (12, 60.0), "c": (16, 100.0)}  # id -> (dim, logit scale)


# --------------------------------------------------------------------------- plain-loop reference


def _norm(v: list[float]) -> list[float]:
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def _dot(u: list[float], v: list[float]) -> float:
    return sum(x * y for x, y in zip(u, v))


def _log_softmax(row: list[float]) -> list[float]:
    m = max(row)
    lse = m + math.log(sum(math.exp(x - m) for x in row))
    return [x - lse for x in row]


def _sim(u: list[list[float]], v: list[list[float]], scale: float) -> list[list[float]]:
    return [[scale * _dot(a, b) for b in v] for a in u]


def reference(image, texts, scale, teachers, scales, lam, weights) -> dict[str, float]:
    """The formula of docs/reference.md#loss with Python floats and loops, nothing shared with the module."""
    b = len(image)
    img = [_norm(r) for r in image]
    total = clip_total = kd_total = 0.0
    out = {}
    for c, w in weights.items():
        if w == 0:
            continue
        txt = [_norm(r) for r in texts[c]]
        clip = 0.0
        for rows, cols in ((img, txt), (txt, img)):
            for i, row in enumerate(_sim(rows, cols, scale)):
                clip -= _log_softmax(row)[i]
        clip /= 2 * b
        kd = 0.0
        for t, s_t in scales.items():
            ti = [_norm(r) for r in teachers[t]["image"]]
            tt = [_norm(r) for r in teachers[t][c]]
            for (trows, tcols), (srows, scols) in (((ti, tt), (img, txt)), ((tt, ti), (txt, img))):
                for trow, srow in zip(_sim(trows, tcols, s_t), _sim(srows, scols, scale)):
                    lp, lq = _log_softmax(trow), _log_softmax(srow)
                    kd += sum(math.exp(p) * (p - q) for p, q in zip(lp, lq))
        kd /= 2 * b
        out[f"clip_{c}"], out[f"distill_{c}"] = clip, kd
        clip_total += w * (1 - lam) * clip
        kd_total += w * lam * kd
    total = clip_total + kd_total
    out.update(loss=total, contrastive_loss=clip_total, distill_loss=kd_total)
    return out


def _inputs(b: int, d: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(b, d, generator=g)
    texts = {"gt": torch.randn(b, d, generator=g), "syn": torch.randn(b, d, generator=g)}
    teachers = {
        t: {
            "image": torch.randn(b, dim, generator=g),
            "gt": torch.randn(b, dim, generator=g),
            "syn": torch.randn(b, dim, generator=g),
        }
        for t, (dim, _) in TEACHERS.items()
    }
    # Correlate teachers with the student a little so the distributions are not uniform noise.
    return image, texts, teachers


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("weights,student_scale", [((1.0, 1.0), 10.0), ((1.0, 0.5), 50.0), ((0.0, 2.0), 1 / 0.07)])
def test_loss_matches_plain_loop_reference(lam, weights, student_scale):
    image, texts, teachers = _inputs(b=6, d=10, seed=int(lam * 10) + int(student_scale))
    scales = {t: s for t, (_, s) in TEACHERS.items()}
    loss = DistillClipLoss(scales, lam=lam, gt_weight=weights[0], syn_weight=weights[1])
    got = loss(image, texts, torch.tensor(student_scale), teachers)
    want = reference(
        image.tolist(),
        {c: v.tolist() for c, v in texts.items()},
        student_scale,
        {t: {k: v.tolist() for k, v in d.items()} for t, d in teachers.items()},
        scales,
        lam,
        {"gt": weights[0], "syn": weights[1]},
    )
    assert {"loss", "contrastive_loss", "distill_loss"} <= set(got)
    assert ("distill_syn" in got) == (lam > 0 and weights[1] > 0)
    for name, value in got.items():
        assert value.item() == pytest.approx(want[name], rel=1e-5, abs=1e-6), name
    assert got["loss"].item() > 0


def test_teacher_subset_by_id_and_unused_teachers_ignored():
    image, texts, teachers = _inputs(b=5, d=10, seed=3)
    subset = {"c": 100.0, "a": 70.0}
    got = DistillClipLoss(subset, lam=1.0)(image, texts, torch.tensor(20.0), teachers)
    want = reference(
        image.tolist(),
        {c: v.tolist() for c, v in texts.items()},
        20.0,
        {t: {k: v.tolist() for k, v in d.items()} for t, d in teachers.items()},
        subset,
        1.0,
        {"gt": 1.0, "syn": 1.0},
    )
    assert got["loss"].item() == pytest.approx(want["loss"], rel=1e-5)
    with pytest.raises(KeyError, match="missing"):
        DistillClipLoss({"zz": 10.0}, lam=0.5)(image, texts, torch.tensor(20.0), teachers)


def test_kl_sum_gradient_is_k_times_averaged_softmax_cross_entropy():
    """The documented relation between the paper's form (ours) and the public trainer's form."""
    image, texts, teachers = _inputs(b=7, d=10, seed=5)
    scales = {t: s for t, (_, s) in TEACHERS.items()}
    img = image.clone().requires_grad_(True)
    ours = DistillClipLoss(scales, lam=1.0, syn_weight=0.0)(img, texts, torch.tensor(30.0), teachers)["loss"]
    (g_ours,) = torch.autograd.grad(ours, img)

    img2 = image.clone().requires_grad_(True)
    n = lambda x: F.normalize(x, dim=-1)  # noqa: E731
    si, st = n(img2), n(texts["gt"])
    public = 0.0
    for s_rows, s_cols, key_rows, key_cols in ((si, st, "image", "gt"), (st, si, "gt", "image")):
        p_avg = sum(
            F.softmax(s * n(teachers[t][key_rows]) @ n(teachers[t][key_cols]).T, dim=-1) for t, s in scales.items()
        ) / len(scales)
        public = public - (p_avg * F.log_softmax(30.0 * s_rows @ s_cols.T, dim=-1)).sum() / (2 * len(image))
    (g_public,) = torch.autograd.grad(public, img2)
    torch.testing.assert_close(g_ours, len(scales) * g_public, rtol=1e-4, atol=1e-7)


def test_zero_coefficient_terms_carry_no_gradient():
    image, texts, teachers = _inputs(b=4, d=10, seed=9)
    img = image.clone().requires_grad_(True)
    out = DistillClipLoss({"a": 70.0}, lam=1.0)(img, texts, torch.tensor(10.0), teachers)
    assert not out["clip_gt"].requires_grad and out["contrastive_loss"].item() == 0
    assert out["loss"].requires_grad


# --------------------------------------------------------------------------- two gloo ranks


class _Encoders(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.img = torch.nn.Linear(10, 8)
        self.txt = torch.nn.Linear(10, 8)
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(20.0)))

    def forward(self, x, t):
        return self.img(x), self.txt(t), self.logit_scale.exp()


def _global_batch(b: int):
    g = torch.Generator().manual_seed(11)
    x, gt, syn = (torch.randn(b, 10, generator=g) for _ in range(3))
    teachers = {
        t: {k: torch.randn(b, dim, generator=g) for k in ("image", "gt", "syn")} for t, (dim, _) in TEACHERS.items()
    }
    return x, gt, syn, teachers


def _step(model, loss_fn, x, gt, syn, teachers):
    img, txt, scale = model(x, torch.cat([gt, syn]))
    n = len(x)
    out = loss_fn(img, {"gt": txt[:n], "syn": txt[n:]}, scale, teachers)
    out["loss"].backward()
    return out


def _rank_main(
    rank: int, world: int, init_file: str, out_dir: str, local_loss: bool, b: int, kd_form: str = "summed"
) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        x, gt, syn, teachers = _global_batch(b * world)
        sl = slice(rank * b, (rank + 1) * b)
        model = DDP(_Encoders())
        loss_fn = DistillClipLoss(
            {t: s for t, (_, s) in TEACHERS.items()}, lam=0.5, syn_weight=0.7, local_loss=local_loss, kd_form=kd_form
        )
        out = _step(
            model, loss_fn, x[sl], gt[sl], syn[sl], {t: {k: v[sl] for k, v in d.items()} for t, d in teachers.items()}
        )
        result = {f"loss.{k}": v.detach() for k, v in out.items()}
        result.update({f"grad.{n}": p.grad for n, p in model.module.named_parameters()})
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("local_loss,kd_form", [(False, "summed"), (True, "summed"), (False, "apple")])
def test_two_gloo_ranks_equal_one_process_on_concatenated_batch(tmp_path, local_loss, kd_form):
    import torch.multiprocessing as mp

    b, world = 3, 2
    mp.start_processes(
        _rank_main,
        args=(world, str(tmp_path / "init"), str(tmp_path), local_loss, b, kd_form),
        nprocs=world,
        start_method="fork",
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]

    model = _Encoders()
    x, gt, syn, teachers = _global_batch(b * world)
    single = _step(
        model,
        DistillClipLoss({t: s for t, (_, s) in TEACHERS.items()}, lam=0.5, syn_weight=0.7, kd_form=kd_form),
        x,
        gt,
        syn,
        teachers,
    )
    for name, value in single.items():
        mean = sum(r[f"loss.{name}"] for r in ranks) / world
        torch.testing.assert_close(mean, value.detach(), rtol=1e-5, atol=1e-6)
        if not local_loss:  # every rank holds the global value itself
            for r in ranks:
                torch.testing.assert_close(r[f"loss.{name}"], value.detach(), rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        for r in ranks:  # DDP-averaged gradients are the same on every rank and equal the single run's
            torch.testing.assert_close(r[f"grad.{n}"], p.grad, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- Apple's KD form


def apple_reference(image, texts, scale, teachers, scales, lam, weights) -> dict[str, float]:
    """ml-mobileclip's DRClipLoss (average_after_softmax) with floats and loops: per caption
    kind, CLIP = mean over rows of CE (both directions) / 2, and KD = mean over rows of
    -Σ_j P_ij log softmax(student row)_j with P = (1/K) Σ_k softmax(teacher k row), / 2."""
    b = len(image)
    img = [_norm(r) for r in image]
    out, clip_total, kd_total = {}, 0.0, 0.0
    for c, w in weights.items():
        if w == 0:
            continue
        txt = [_norm(r) for r in texts[c]]
        clip = 0.0
        for rows, cols in ((img, txt), (txt, img)):
            for i, row in enumerate(_sim(rows, cols, scale)):
                clip -= _log_softmax(row)[i] / b
        clip /= 2
        kd = 0.0
        for direction in ("image", "text"):
            srows, scols = (img, txt) if direction == "image" else (txt, img)
            student = _sim(srows, scols, scale)
            avg = [[0.0] * b for _ in range(b)]
            for t, s_t in scales.items():
                ti = [_norm(r) for r in teachers[t]["image"]]
                tt = [_norm(r) for r in teachers[t][c]]
                trows, tcols = (ti, tt) if direction == "image" else (tt, ti)
                for i, row in enumerate(_sim(trows, tcols, s_t)):
                    for j, lp in enumerate(_log_softmax(row)):
                        avg[i][j] += math.exp(lp) / len(scales)
            for i in range(b):
                lq = _log_softmax(student[i])
                kd -= sum(avg[i][j] * lq[j] for j in range(b)) / b
        kd /= 2
        out[f"clip_{c}"], out[f"distill_{c}"] = clip, kd
        clip_total += w * (1 - lam) * clip
        kd_total += w * lam * kd
    out.update(loss=clip_total + kd_total, contrastive_loss=clip_total, distill_loss=kd_total)
    return out


def _fd_grad(fn, x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Central finite differences of the float64 plain-loop reference."""
    g = torch.zeros_like(x, dtype=torch.float64)
    flat = x.double().flatten()
    for i in range(flat.numel()):
        up, down = flat.clone(), flat.clone()
        up[i] += eps
        down[i] -= eps
        g.view(-1)[i] = (fn(up.view_as(x)) - fn(down.view_as(x))) / (2 * eps)
    return g


@pytest.mark.parametrize("lam,weights", [(1.0, (1.0, 1.0)), (0.5, (1.0, 0.5)), (0.25, (0.0, 1.0))])
def test_apple_kd_form_matches_plain_loop_reference_values_and_gradients(lam, weights):
    image, texts, teachers = _inputs(b=5, d=6, seed=11)
    scales = {t: s for t, (_, s) in TEACHERS.items()}
    w = {"gt": weights[0], "syn": weights[1]}
    plain = lambda im, tx=texts: apple_reference(  # noqa: E731
        im.tolist(),
        {c: v.tolist() for c, v in tx.items()},
        20.0,
        {t: {k: v.tolist() for k, v in d.items()} for t, d in teachers.items()},
        scales,
        lam,
        w,
    )
    c = "gt" if w["gt"] else "syn"  # a caption kind that is trained on
    img = image.clone().requires_grad_(True)
    txt = {k: v.clone().requires_grad_(k == c) for k, v in texts.items()}
    loss = DistillClipLoss(scales, lam=lam, gt_weight=w["gt"], syn_weight=w["syn"], kd_form="apple")
    got = loss(img, txt, torch.tensor(20.0), teachers)
    want = plain(image)
    for k, v in want.items():
        assert got[k].item() == pytest.approx(v, rel=1e-5, abs=1e-6), k
    g_img, g_txt = torch.autograd.grad(got["loss"], [img, txt[c]])
    torch.testing.assert_close(g_img, _fd_grad(lambda x: plain(x)["loss"], image).float(), rtol=1e-3, atol=1e-6)
    fd_txt = _fd_grad(lambda x: plain(image, {**texts, c: x})["loss"], texts[c])
    torch.testing.assert_close(g_txt, fd_txt.float(), rtol=1e-3, atol=1e-6)


def test_apple_kd_form_is_summed_form_over_k_in_gradient_and_differs_by_entropy_in_value():
    image, texts, teachers = _inputs(b=6, d=10, seed=3)
    scales = {t: s for t, (_, s) in TEACHERS.items()}
    grads, values = {}, {}
    for form in ("summed", "apple"):
        img = image.clone().requires_grad_(True)
        v = DistillClipLoss(scales, lam=1.0, syn_weight=0.0, kd_form=form)(img, texts, torch.tensor(30.0), teachers)
        values[form] = v["loss"].item()
        (grads[form],) = torch.autograd.grad(v["loss"], img)
    torch.testing.assert_close(grads["summed"], len(scales) * grads["apple"], rtol=1e-4, atol=1e-7)
    assert values["apple"] != pytest.approx(values["summed"] / len(scales))
    with pytest.raises(ValueError, match="kd_form"):
        DistillClipLoss(scales, kd_form="mean")
