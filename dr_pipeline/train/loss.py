"""Multi-teacher CLIP distillation loss (MobileCLIP / MobileCLIP2, docs/reference.md#loss).

For each caption kind c ∈ {gt, syn} (ground-truth, synthetic) with weight w_c::

    L = Σ_c w_c · [ (1 − λ) · L_CLIP^c + λ · L_Distill^c ]

    L_CLIP^c    = 1/(2b) Σ_rows [ CE(ŝ Φ_img Φ_txtᵀ, I) + CE(ŝ Φ_txt Φ_imgᵀ, I) ]
    L_Distill^c = 1/(2b) Σ_k Σ_rows [ KL(S_τk(Ψ_img^k, Ψ_txt^k) ‖ S_τ̂(Φ_img, Φ_txt))
                                    + KL(S_τk(Ψ_txt^k, Ψ_img^k) ‖ S_τ̂(Φ_txt, Φ_img)) ]

Φ = student, Ψ^k = teacher k, S_τ(U, V) = row-wise softmax of U·Vᵀ·scale (scale = 1/τ:
each teacher's own stored logit scale, the student's learned one), b = the *global* batch.

**KD form** (``kd_form``). ``"summed"`` (default) is the paper's form: the per-teacher KL
terms are *summed*. ``"apple"`` is the public trainer's (ml-mobileclip's open_clip patch,
``DRClipLoss`` with ``average_after_softmax``): the K teachers' softmax distributions are
averaged, P = 1/K Σ_k S_τk(Ψ^k), and the term is the cross-entropy with the student's
log-softmax, 1/(2b) Σ_rows [CE(P_img→txt, Φ) + CE(P_txt→img, Φ)]. Its gradient is the summed
form's divided by K and its value is the summed form's divided by K plus the mean of the
teachers' entropies (a constant; docs/reference.md#summed-vs-averaged-softmax-kd-form).
``tests/test_train_loss.py`` checks both forms against plain-loop references.
(Apple's multi-GPU path without ``local_loss`` uses the transpose of the averaged
image→text matrix for the text→image rows; here every row is a row softmax, which is what
Apple's single-GPU and ``local_loss`` paths compute.)

**Several ranks.** Features are gathered from every rank with a gradient-carrying all-gather
(``gather_rows``), so the softmax of each row runs over the
global batch and its targets (the diagonal, the teacher rows) are the right ones. Two modes
give the same value (mean over ranks) and the same DDP-averaged gradients:
``local_loss=False`` computes all global rows on every rank (simple, b² memory);
``local_loss=True`` computes only this rank's rows against all columns, scaled by the world
size so DDP's gradient averaging yields the global gradient (memory b_local·b). Every rank
must hold the same number of rows.

Embeddings are L2-normalized here (teacher embeddings are stored in bf16, so their norm is
only ≈ 1). The loss runs in float32 even under autocast.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

KINDS = ("gt", "syn")


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _AllGather(torch.autograd.Function):
    """All-gather whose backward hands each rank the sum over ranks of the gradient of its
    rows (what ``torch.distributed.nn.functional.all_gather`` does; that one is deprecated)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        rank, world = _world()
        ctx.rank, ctx.rows = rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_rows(x: torch.Tensor, with_grad: bool) -> torch.Tensor:
    """Concatenate ``x`` from every rank in rank order (``x`` itself when not distributed).
    ``with_grad``: gradients flow back to the rank that owns each row."""
    rank, world = _world()
    if world == 1:
        return x
    if with_grad:
        return _AllGather.apply(x)
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    parts[rank] = x
    return torch.cat(parts, dim=0)


def _kl_rows(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Σ over rows of KL(softmax(teacher row) ‖ softmax(student row))."""
    return F.kl_div(
        F.log_softmax(student_logits, dim=-1), F.log_softmax(teacher_logits, dim=-1), reduction="sum", log_target=True
    )


def _ce_rows(teacher_probs: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Σ over rows of CE(teacher distribution row, softmax(student row))."""
    return -(teacher_probs * F.log_softmax(student_logits, dim=-1)).sum()


KD_FORMS = ("summed", "apple")


class DistillClipLoss(nn.Module):
    """(1−λ)·CLIP + λ·multi-teacher KL distillation, for GT and synthetic captions.

    ``teacher_scales`` maps the teacher ids to use (any subset of those in the data) to
    their logit scale 1/τ_k. ``forward`` returns named parts: ``loss`` (what to backprop)
    = ``contrastive_loss`` + ``distill_loss`` (both already weighted), plus the unweighted
    per-kind terms ``clip_gt``, ``clip_syn``, ``distill_gt``, ``distill_syn`` for logging.
    A term whose coefficient is 0 is computed without gradient (logged only), and a caption
    kind whose weight is 0 is skipped entirely.
    """

    def __init__(
        self,
        teacher_scales: Mapping[str, float],
        lam: float = 1.0,
        gt_weight: float = 1.0,
        syn_weight: float = 1.0,
        local_loss: bool = False,
        kd_form: str = "summed",
    ):
        super().__init__()
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"lam must be in [0, 1], got {lam}")
        if kd_form not in KD_FORMS:
            raise ValueError(f"kd_form must be one of {KD_FORMS}, got {kd_form!r}")
        self.kd_form = kd_form
        if lam > 0 and not teacher_scales:
            raise ValueError("distillation (lam > 0) needs at least one teacher")
        self.teacher_scales = {str(k): float(v) for k, v in teacher_scales.items()}
        self.lam = float(lam)
        self.weights = {"gt": float(gt_weight), "syn": float(syn_weight)}
        self.local_loss = local_loss

    def kinds(self) -> list[str]:
        return [c for c in KINDS if self.weights[c] > 0]

    def forward(
        self,
        image: torch.Tensor,
        texts: Mapping[str, torch.Tensor],
        logit_scale: torch.Tensor,
        teachers: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    ) -> dict[str, torch.Tensor]:
        """image [b, d]; texts {"gt"/"syn": [b, d]}; teachers {id: {"image"/"gt"/"syn": [b, D_k]}}."""
        device_type = image.device.type
        with torch.autocast(device_type=device_type, enabled=False):
            return self._forward(image, texts, logit_scale, teachers or {})

    def _forward(self, image, texts, logit_scale, teachers) -> dict[str, torch.Tensor]:
        rank, world = _world()
        b = image.shape[0]
        # Global mode: every rank computes all 2·b·world rows. Local mode: its own 2·b rows;
        # the mean over ranks (DDP's gradient average) is then the global loss.
        rows = slice(rank * b, (rank + 1) * b) if self.local_loss else slice(None)
        norm = 1.0 / (2.0 * b) if self.local_loss else 1.0 / (2.0 * b * world)
        missing = [t for t in self.teacher_scales if t not in teachers] if self.lam > 0 else []
        if missing:
            raise KeyError(f"teacher embeddings missing for {missing} (have {sorted(teachers)})")
        scale = logit_scale.float()
        img_all = gather_rows(F.normalize(image.float(), dim=-1), with_grad=True)
        t_img = {t: self._teacher(teachers[t]["image"]) for t in self.teacher_scales} if self.lam > 0 else {}

        out: dict[str, torch.Tensor] = {}
        contrastive = distill = image.new_zeros((), dtype=torch.float32)
        for c in self.kinds():
            txt_all = gather_rows(F.normalize(texts[c].float(), dim=-1), with_grad=True)
            s_it = scale * img_all[rows] @ txt_all.T  # student logits, image -> text rows
            s_ti = scale * txt_all[rows] @ img_all.T  # student logits, text -> image rows
            labels = torch.arange(img_all.shape[0], device=image.device)[rows]
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.lam < 1):
                clip = (
                    F.cross_entropy(s_it, labels, reduction="sum") + F.cross_entropy(s_ti, labels, reduction="sum")
                ) * norm
            out[f"clip_{c}"] = clip
            contrastive = contrastive + self.weights[c] * (1 - self.lam) * clip
            if self.lam > 0:
                t_txt = {t: self._teacher(teachers[t][c]) for t in self.teacher_scales}
                kd = self._distill(t_img, t_txt, rows, s_it, s_ti)
                out[f"distill_{c}"] = kd * norm
                distill = distill + self.weights[c] * self.lam * out[f"distill_{c}"]
        out["contrastive_loss"] = contrastive
        out["distill_loss"] = distill
        out["loss"] = contrastive + distill
        return out

    def _distill(self, t_img, t_txt, rows, s_it, s_ti) -> torch.Tensor:
        """Σ over this rank's rows of the KD term (both directions), per ``kd_form``."""
        if self.kd_form == "summed":
            kd = s_it.new_zeros(())
            for t, s_t in self.teacher_scales.items():
                ti, tt = t_img[t], t_txt[t]
                kd = kd + _kl_rows(s_t * ti[rows] @ tt.T, s_it) + _kl_rows(s_t * tt[rows] @ ti.T, s_ti)
            return kd
        k = len(self.teacher_scales)
        p_it = sum(F.softmax(s_t * t_img[t][rows] @ t_txt[t].T, dim=-1) for t, s_t in self.teacher_scales.items()) / k
        p_ti = sum(F.softmax(s_t * t_txt[t][rows] @ t_img[t].T, dim=-1) for t, s_t in self.teacher_scales.items()) / k
        return _ce_rows(p_it, s_it) + _ce_rows(p_ti, s_ti)

    @staticmethod
    def _teacher(x: torch.Tensor) -> torch.Tensor:
        return gather_rows(F.normalize(x.float(), dim=-1), with_grad=False)
