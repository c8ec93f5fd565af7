"""CoCa synthetic captions: each image encoded once, all B·k captions decoded as one batch.

Sampling is reproducible per caption: row (seed, key, caption index, attempt) pre-draws one
uniform per decoding step from a Philox stream keyed by sha256 of those values (plus the
captioner id, so two captioners do not share streams), and picks its token by inverse CDF over
the filtered distribution. A caption therefore does not depend on the batch it was decoded in,
nor on its position there.

The decoding loop follows open_clip's ``CoCa.generate`` step for step, so greedy decoding here
emits exactly the tokens of ``generate(generation_type="top_k", top_k=1, seq_len=max_len,
min_seq_len=min_len)``: ``max_len`` counts the start token and the (forced) final end-of-text,
end-of-text is suppressed while the prefix is shorter than ``min_len``, and a row stops at
end-of-text or at the pad id 0 (generate's rule; a trained CoCa never emits 0, its loss ignores it).

Two implementations of one decoding step share that loop:

* ``next_logits`` (reference, ``cache=False``): recomputes the whole prefix every step, exactly
  as ``generate`` does (minus the image re-encode and the all-position vocabulary projection).
* the KV-cached step (default): per step only the newest token runs through the text tower and
  the multimodal decoder. Self-attention keys/values of both towers are cached per row; the
  cross-attention keys/values over the image tokens are computed once per *image* (not per
  caption row) and the k caption rows of an image are folded into the query axis of one
  attention call over them, so image tokens are never copied per caption. Rows that finished
  are compacted out of the batch (caches included) every few steps. CoCa's text tower appends
  its cls token *after* the text and uses a causal mask, so the text positions never attend to
  it: the cached step leaves it out and computes the same token embeddings ``generate`` feeds
  the decoder (tests: greedy == ``generate``; cached == uncached logits and captions).
"""

from __future__ import annotations

import collections
import hashlib
import logging
import re
from dataclasses import dataclass, field

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import MultimodalTransformer, ResidualAttentionBlock, TextTransformer

from dr_pipeline.config import CaptionerSpec, EnsembleSpec
from dr_pipeline.models.teachers import autocast, load_model, views_to_input

SOT, EOT = "<start_of_text>", "<end_of_text>"
log = logging.getLogger(__name__)


@dataclass
class CaptionBatch:
    captions: list[list[str]]  # per image: up to k clean captions, in caption-index order
    rejected: collections.Counter = field(default_factory=collections.Counter)  # reason -> rejected samples
    attempts: int = 0  # draws decoded: first draws + redraws
    resampled: int = 0  # redraws (draws after a caption's first; marker: captions_resampled)
    row_steps: int = 0  # decoder row-steps run, redraws and speculative draws included: the decode cost
    wasted_row_steps: int = 0  # row-steps of speculative draws after the one a caption kept
    speculated: int = 0  # draws started before the previous draw's verdict


# --------------------------------------------------------------------------- text hygiene

_SENTENCE_END = re.compile(r"\.(\s|$)")


def clean_caption(text: str) -> str:
    """Drop special tokens and anything after end-of-text, cut at the first sentence end, tidy spaces."""
    text = text.split(EOT, 1)[0].replace(SOT, " ")
    m = _SENTENCE_END.search(text)  # "3.5 m" is no sentence end; "left . a" is
    if m:
        text = text[: m.start()]
    text = " ".join(text.split())
    # BPE decoding leaves spaces before punctuation ("a dog , running"); rejoin them.
    text = re.sub(r"\s+([,;:!?])", r"\1", text)
    return text.strip(" ,;:")


def is_degenerate(text: str, min_words: int = 2) -> bool:
    """Too short, mostly non-alphabetic, or dominated by one repeated word ("a 2 2 2 2")."""
    words = text.lower().split()
    n = len(words)
    if n < min_words:
        return True
    if sum(any(c.isalpha() for c in w) for w in words) < 0.5 * n:
        return True
    counts = collections.Counter(words)
    if len(counts) == 1:
        return True
    if n >= 4 and counts.most_common(1)[0][1] > 0.5 * n:
        return True
    return any(words[i] == words[i + 1] == words[i + 2] for i in range(n - 2))  # "dog dog dog"


@dataclass(frozen=True)
class DegenerationRule:
    """When a draw is given up *while it is decoded*, so its row is redrawn at once instead of
    after a full decode. Checks see only final words: every word but the last of the cleaned
    prefix (a later token can still extend the last word or glue punctuation to it). The default
    rule only fires on draws ``is_degenerate`` is certain to reject at the end (a word three times
    in a row; too few words with a letter left possible), so it changes no caption, only the
    steps wasted. ``nonword_run`` > 0 is stricter (a run of that many words without a letter):
    it changes which captions pass, so it is set in the output-hashed sampling config
    (``sampling.give_up_repeat`` / ``give_up_nonword_run``)."""

    repeat: int = 3  # same word this many times in a row (3 = is_degenerate's; others change captions)
    nonword_run: int = 0  # 0 = off

    def gives_up(self, final_words: list[str], words_left: int) -> bool:
        """``final_words`` lower-cased; ``words_left`` the most words the draw can still add."""
        n = len(final_words)
        alpha = [any(c.isalpha() for c in w) for w in final_words]
        # is_degenerate: fewer than half the words have a letter, even if every later word has one
        if sum(alpha) + words_left < 0.5 * (n + words_left):
            return True
        if self.nonword_run and any(not any(alpha[i : i + self.nonword_run]) for i in range(n - self.nonword_run + 1)):
            return True
        r = self.repeat
        return r > 0 and any(len(set(final_words[i : i + r])) == 1 for i in range(n - r + 1))


# --------------------------------------------------------------------------- seeded uniforms


def row_uniforms(seed: int, key: str, index: int, attempt: int, n: int, salt: str = "") -> np.ndarray:
    """n uniforms in [0, 1) for one caption row, a pure function of its identity."""
    digest = hashlib.sha256(f"caption\x00{salt}\x00{seed}\x00{key}\x00{index}\x00{attempt}".encode()).digest()
    bits = np.random.Philox(key=np.frombuffer(digest[:16], dtype="<u8")).random_raw(n)
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53  # top 53 bits, like random()


def _nucleus_threshold(vals: torch.Tensor, top_p: float) -> torch.Tensor:
    """[N, 1] smallest kept probability, from each row's probabilities sorted descending."""
    inside = (vals.cumsum(dim=-1) - vals) < top_p  # smallest prefix reaching top_p
    return vals.gather(1, inside.sum(dim=-1, keepdim=True) - 1)


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """[N, 1] index of the token each row's uniform falls on, CDF in the given column order."""
    cdf = probs.double().cumsum(dim=-1)
    target = (u.to(cdf) * cdf[:, -1]).unsqueeze(1)
    choice = torch.searchsorted(cdf, target, right=True)
    # u * total may round up to total: never step past the last token with mass.
    last = probs.shape[-1] - 1 - (probs > 0).flip(-1).int().argmax(dim=-1, keepdim=True)
    return torch.minimum(choice, last)


def pick_tokens(
    logits: torch.Tensor, u: torch.Tensor | None, temperature: float, top_k: int, top_p: float, prefilter: int = 256
) -> torch.Tensor:
    """Next token per row: argmax if ``u`` is None, else temperature -> top-k -> top-p -> inverse CDF.

    Each row's token is a function of its own logits and uniform only. Cut-offs are value
    thresholds (tokens tied at the boundary are all kept) and the CDF runs in vocabulary order,
    so neither depends on how a sort orders ties, nor on the other rows.

    Speed: a row that keeps fewer than m of its most probable tokens (m = 32, else ``prefilter``;
    the usual case for a trained captioner's small nuclei) gets its cut-off and CDF from those m
    candidates only, put back in vocabulary order; only the other rows go on to the next m or
    to the full vocabulary. The tokens skipped have zero mass and adding zeros is exact, so every
    path picks the same token for a row.
    """
    if u is None:
        return logits.argmax(dim=-1)
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / max(temperature, 1e-6)
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=-1)
    out = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
    rows = torch.arange(probs.shape[0], device=probs.device)  # rows still to pick
    if top_p < 1.0 or 0 < top_k <= prefilter:
        for m in sorted({min(32, prefilter), prefilter}):
            if m >= vocab or rows.numel() == 0:
                break
            vals, ids = probs[rows].topk(m, dim=-1)
            ok = torch.ones_like(rows, dtype=torch.bool)
            if top_p < 1.0:
                ok = (vals.cumsum(dim=-1) - vals)[:, -1] >= top_p  # the nucleus ends inside
                vals = vals * (vals >= _nucleus_threshold(vals, top_p))
            ok &= vals[:, -1] == 0  # every kept token is a candidate
            if ok.any():
                ids, order = ids[ok].sort(dim=-1)
                out[rows[ok]] = ids.gather(1, _inverse_cdf(vals[ok].gather(1, order), u[rows[ok]])).squeeze(1)
                rows = rows[~ok]
        if rows.numel() == 0:
            return out
        probs, u = probs[rows], u[rows]
    if top_p < 1.0:
        probs = probs * (probs >= _nucleus_threshold(probs.sort(dim=-1, descending=True).values, top_p))
    out[rows] = _inverse_cdf(probs, u).squeeze(1)
    return out


# --------------------------------------------------------------------------- KV-cached steps


def kv_cache_unsupported(model: torch.nn.Module) -> str | None:
    """Why the cached step cannot run this CoCa exactly (None: it can). Such models decode with
    the reference full-prefix step instead (slower, same tokens)."""
    text, dec = getattr(model, "text", None), getattr(model, "text_decoder", None)
    if not isinstance(text, TextTransformer) or not isinstance(dec, MultimodalTransformer):
        return "not open_clip's TextTransformer + MultimodalTransformer"
    if text.attn_mask is None or text.use_pad_mask:
        return "text tower is not causal"
    if not (text.transformer.batch_first and dec.batch_first):
        return "towers do not run batch-first"
    for b in [*text.transformer.resblocks, *dec.resblocks, *dec.cross_attn]:
        if type(b) is not ResidualAttentionBlock:
            return f"{type(b).__name__} blocks"
        a = b.attn
        if not a._qkv_same_embed_dim or a.bias_k is not None or a.add_zero_attn:
            return "non-standard MultiheadAttention"
    return None


class _Positions:
    """The position each batch row feeds this step, ``p`` [n]. Rows all at one position (no row has
    been redrawn yet) use plain slices of the caches; otherwise each row's attention is masked to
    its own prefix, so a redrawn row reuses its slot while the others go on."""

    def __init__(self, p: torch.Tensor) -> None:
        lo, hi = int(p.min()), int(p.max())
        self.p, self.kv_len = p, hi + 1
        self.same = lo if lo == hi else None
        self.rows = torch.arange(p.numel(), device=p.device)
        self.mask = None if lo == hi else (torch.arange(hi + 1, device=p.device) <= p[:, None]).view(-1, 1, 1, hi + 1)

    def write(self, cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the newest keys/values [n, H, dh] in cache [2, n, H, L, dh]."""
        if self.same is not None:
            cache[0, :, :, self.same] = k
            cache[1, :, :, self.same] = v
        else:
            cache[0, self.rows, :, self.p] = k
            cache[1, self.rows, :, self.p] = v


def _self_attn_step(
    block: ResidualAttentionBlock, x: torch.Tensor, cache: torch.Tensor, pos: _Positions
) -> torch.Tensor:
    """One residual block for each row's newest position only; x [n, W]; cache [2, n, H, L, dh]
    holds the keys/values of earlier positions and receives the newest. Same math as the block's
    causal forward (pre-norm, fused q/k/v projection, SDPA, LayerScale, MLP) for the last query."""
    a = block.attn
    n, w = x.shape
    h = a.num_heads
    qkv = F.linear(block.ln_1(x), a.in_proj_weight, a.in_proj_bias).view(n, 3, h, w // h)
    pos.write(cache, qkv[:, 1], qkv[:, 2])
    k, v = cache[0, :, :, : pos.kv_len], cache[1, :, :, : pos.kv_len]
    o = F.scaled_dot_product_attention(qkv[:, 0].unsqueeze(2), k, v, attn_mask=pos.mask)
    x = x + block.ls_1(a.out_proj(o.reshape(n, w)))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


class _Groups:
    """Caption rows grouped by image for cross-attention: row r is query ``slot[r]`` of image
    ``img[r]``; queries [n, H, dh] scatter to [B_img, H, k_max, dh] against the per-image K/V."""

    def __init__(self, img: torch.Tensor, n_img: int) -> None:
        """``n_img``: images in the K/V (some may have no row left since it was last compacted)."""
        n = img.numel()
        order = torch.argsort(img, stable=True)
        s = img[order]
        slot = torch.empty_like(img)
        slot[order] = torch.arange(n, device=img.device) - torch.searchsorted(s, s)
        self.img, self.slot, self.n = img, slot, n
        self.n_img, self.k_max = n_img, int(slot.max()) + 1
        # rows laid out image-major without holes (the usual case before any row finishes): views only
        self.dense = n == self.n_img * self.k_max and bool(
            (img * self.k_max + slot == torch.arange(n, device=img.device)).all()
        )

    def scatter(self, q: torch.Tensor) -> torch.Tensor:
        _, h, dh = q.shape
        if self.dense:
            return q.view(self.n_img, self.k_max, h, dh).transpose(1, 2)
        out = q.new_zeros(self.n_img, self.k_max, h, dh)
        out[self.img, self.slot] = q
        return out.transpose(1, 2)

    def gather(self, o: torch.Tensor) -> torch.Tensor:
        o = o.transpose(1, 2)  # [B_img, k_max, H, dh]
        if self.dense:
            return o.reshape(self.n, -1)
        return o[self.img, self.slot].reshape(self.n, -1)


def _cross_attn_step(block: ResidualAttentionBlock, x: torch.Tensor, kv: torch.Tensor, groups: _Groups) -> torch.Tensor:
    """Cross-attention block for the newest position; kv [2, B_img, H, T, dh] precomputed per image.
    Attention as two batched matmuls over the k queries of each image: with a handful of queries
    per image SDPA's kernel is slower than plain matmuls (and these are the shapes the bench's
    roof measures)."""
    a = block.attn
    n, w = x.shape
    h = a.num_heads
    bias = a.in_proj_bias[:w] if a.in_proj_bias is not None else None
    q = F.linear(block.ln_1(x), a.in_proj_weight[:w], bias).view(n, h, w // h)
    q = groups.scatter(q * (w // h) ** -0.5)
    o = groups.gather(torch.softmax(q @ kv[0].transpose(-1, -2), dim=-1) @ kv[1])
    x = x + block.ls_1(a.out_proj(o))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


# --------------------------------------------------------------------------- redraws


class _Draws:
    """caption()'s bookkeeping for rows (key, caption index) and their draws. Row r's draw a uses
    ``row_uniforms(seed, key, index, a)``, and the row keeps its first draw in attempt order that
    passes: a caption depends on its identity only, never on the batch, its slot, the step its draw
    started at, or whether a later draw was started early (speculation, below).

    Speculation: when fewer than ``speculate_rows`` slots are busy (a step costs nearly the same
    for a few rows more), free slots start the next draws of rows still being decoded, before the
    current draw's verdict. A draw after the one a row keeps is discarded and not counted in
    ``rejected`` / ``attempts``, which stay those of drawing one after the other; its steps are
    counted in ``row_steps`` and ``wasted_row_steps``."""

    def __init__(
        self, cap: Captioner, keys: list[str], index: list[int], seed: int, max_attempts: int, greedy: bool
    ) -> None:
        self.keys, self.index, self.seed = keys, index, seed
        self.salt, self.max_len = cap.id, cap.spec.sampling.max_len
        self.max_attempts, self.greedy, self.rule = max_attempts, greedy, cap.rule
        n = len(keys)
        self.attempt = [0] * n  # the draw each row kept (or its last, if dropped)
        self.text: list[str | None] = [None] * n
        self.started = [1] * n  # draws started per row: 0 .. started-1
        self.verdicts: list[dict[int, str | None]] = [{} for _ in range(n)]  # draw -> kept text, or None
        self.reasons: list[dict[int, str]] = [{} for _ in range(n)]  # draw -> why it was given up
        self.decided = [False] * n
        self.rejected: collections.Counter = collections.Counter()
        self.row_steps = 0
        self.wasted_row_steps = 0
        self.speculated = 0  # draws started before the previous draw's verdict
        self.draw_steps: dict[tuple[int, int], int] = {}  # (row, draw) -> its decoder steps

    def __len__(self) -> int:
        return len(self.keys)

    def part(self, lo: int, hi: int) -> _Draws:
        sub = _Draws.__new__(_Draws)
        sub.__dict__.update(self.__dict__)
        for name in ("keys", "index", "attempt", "text", "started", "verdicts", "reasons", "decided"):
            setattr(sub, name, getattr(self, name)[lo:hi])
        sub.rejected, sub.row_steps, sub.wasted_row_steps, sub.speculated = collections.Counter(), 0, 0, 0
        sub.draw_steps = {}
        return sub

    def merge(self, sub: _Draws, lo: int) -> None:
        self.attempt[lo : lo + len(sub)] = sub.attempt
        self.text[lo : lo + len(sub)] = sub.text
        self.decided[lo : lo + len(sub)] = sub.decided
        self.rejected.update(sub.rejected)
        self.row_steps += sub.row_steps
        self.wasted_row_steps += sum(n for (r, a), n in sub.draw_steps.items() if a > sub.attempt[r])
        self.speculated += sub.speculated

    def count_steps(self, rows: torch.Tensor, draws: torch.Tensor, steps: torch.Tensor) -> None:
        """Decoder steps of draws that just ended (or were discarded) in their slots."""
        for r, a, n in zip(rows.tolist(), draws.tolist(), steps.tolist()):
            self.row_steps += n
            self.draw_steps[r, a] = n

    def uniforms(self, rows: list[int], attempts: list[int] | None = None) -> torch.Tensor:
        """[len(rows), max_len] uniforms of draw ``attempts[i]`` (default 0) of each row."""
        attempts = attempts or [0] * len(rows)
        return torch.from_numpy(
            np.stack(
                [
                    row_uniforms(self.seed, self.keys[r], self.index[r], a, self.max_len, self.salt)
                    for r, a in zip(rows, attempts)
                ]
            )
        )

    def judge(self, r: int, a: int, text: str | None, reason: str | None = None) -> None:
        """Record the verdict on draw a of row r (its clean text, or why it was given up), then
        decide the row if every draw before the first passing one has its verdict."""
        if reason is None:
            reason = "empty" if not text else "degenerate" if is_degenerate(text) else None
        if reason is None:
            self.verdicts[r][a] = text
        else:
            self.verdicts[r][a], self.reasons[r][a] = None, reason
        for b in range(self.max_attempts):
            if b not in self.verdicts[r]:
                return
            if self.verdicts[r][b] is not None or b == self.max_attempts - 1:
                self.decided[r], self.attempt[r], self.text[r] = True, b, self.verdicts[r][b]
                self.rejected.update(self.reasons[r][c] for c in range(b + 1) if c in self.reasons[r])
                return

    def next_draw(self, r: int, speculative: bool = False) -> int | None:
        """Start row r's next draw (its number), or None if it has none left or is decided."""
        if self.decided[r] or self.started[r] >= self.max_attempts:
            return None
        self.started[r] += 1
        self.speculated += speculative
        return self.started[r] - 1

    def review(
        self,
        cap: Captioner,
        seq: torch.Tensor,
        slot_row: torch.Tensor,
        slot_draw: torch.Tensor,
        t: torch.Tensor,
        tok: torch.Tensor,
        was: torch.Tensor,
        done: torch.Tensor,
    ) -> tuple[list[tuple[int, int, int]], torch.Tensor]:
        """After a step: judge the slots whose draw ended (end-of-text, pad, forced end, sentence end)
        or just completed a word. Returns (slot, row, draw) to (re)start in those slots and a mask
        of slots to stop now (their row is decided, or waits on an earlier draw's verdict)."""
        word_end, sentence_end = cap.token_flags()
        ended = done | (was & sentence_end[tok])
        look = (was & (ended | word_end[tok])).nonzero().squeeze(1)
        stop = torch.zeros_like(was)
        start: list[tuple[int, int, int]] = []
        if look.numel() == 0:
            return start, stop
        ids, ts, fin = seq[look].tolist(), t[look].tolist(), ended[look].tolist()
        rows, draws = slot_row[look].tolist(), slot_draw[look].tolist()
        decided_now = set()
        for slot, r, a, row, ti, final in zip(look.tolist(), rows, draws, ids, ts, fin):
            if self.decided[r]:
                continue  # decided earlier in this loop: stopped below
            text = cap.text_of(torch.tensor(row[: ti + 1]))
            if final:
                self.judge(r, a, text)
            elif self.rule.gives_up(text.lower().split()[:-1], self.max_len - 1 - ti):  # last word may change
                self.judge(r, a, None, "degenerate")
            else:
                continue
            if self.decided[r]:
                decided_now.add(r)
                stop[slot] = True
            elif self.verdicts[r][a] is None and (b := self.next_draw(r)) is not None:
                start.append((slot, r, b))  # given up: the row's next draw takes over its slot
            else:
                stop[slot] = True  # passed (or no draws left), waits for an earlier draw's verdict
        if decided_now:  # discard the later draws still running for rows just decided
            stop |= was & torch.isin(slot_row, torch.tensor(sorted(decided_now), device=slot_row.device))
            start = [x for x in start if x[1] not in decided_now]
        return start, stop

    def speculate(
        self, free: list[int], slot_row: torch.Tensor, alive: torch.Tensor, want: int
    ) -> list[tuple[int, int, int]]:
        """Fill free slots with next draws of undecided rows while fewer than ``want`` slots are
        busy, the rows with fewest draws running first."""
        busy = int(alive.sum())
        if busy >= want or not free:
            return []
        running = collections.Counter(slot_row[alive].tolist())
        pending = sorted(
            (n, r) for r, n in running.items() if not self.decided[r] and self.started[r] < self.max_attempts
        )
        out = []
        for (_, r), slot in zip(pending, free[: want - busy]):
            out.append((slot, r, self.next_draw(r, speculative=True)))
        return out


def _ids(values, device) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.long, device=device)


def _first_slot_of(slot_row: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """For each of ``rows``, the first batch slot decoding it."""
    return (slot_row.unsqueeze(0) == rows.unsqueeze(1)).int().argmax(dim=1)


# --------------------------------------------------------------------------- captioner


class Captioner:
    """A frozen CoCa model with a batched, seeded decoding loop."""

    def __init__(
        self,
        spec: CaptionerSpec,
        model: torch.nn.Module,
        tokenizer,
        device: str = "cpu",
        decode_batch: int = 0,
        rule: DegenerationRule | None = None,
        speculate_rows: int = -1,
        compile: str = "auto",
    ) -> None:
        self.spec = spec
        self.id = spec.id
        self.image_size = spec.image_size
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.mean = torch.tensor(spec.mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(spec.std, device=self.device).view(1, 3, 1, 1)
        self.sot = int(getattr(tokenizer, "sot_token_id", 49406))
        self.eot = int(getattr(tokenizer, "eot_token_id", 49407))
        # open_clip's generate treats the pad id (0, which is also "!") as a stop token; so do we.
        self.pad = int(getattr(model, "pad_id", 0))
        if not getattr(model.text_decoder, "batch_first", True):
            raise ValueError(f"captioner '{spec.id}': text decoder must run batch-first")
        # KV-cached decoding unless the architecture is one the cached step does not cover
        self.kv_unsupported = kv_cache_unsupported(model)
        self.use_cache = self.kv_unsupported is None
        self.compact_every = 4  # compact finished rows out at least this often (steps) ...
        self.compact_fraction = 0.125  # ... or as soon as this share of the batch has finished
        self.decode_batch = decode_batch  # caption(): most rows decoded together (0 = all)
        # caption(): free slots start rows' next draws early while fewer than this many are busy.
        # -1 = auto: the whole chunk on CUDA (a step costs about the same for any row count that
        # small); 32 on CPU, where a step's fixed cost (streaming every weight) is that of ~15
        # rows' compute (coca_ViT-B-32: 80 ms for 1 row, 210 for 20, 500 for 80); 0 = never.
        if speculate_rows < 0:
            speculate_rows = 1 << 30 if self.device.type == "cuda" else 32
        self.speculate_rows = speculate_rows
        # torch.compile the cached step ("auto": on CUDA only; on CPU it costs minutes of start-up
        # for little gain, BENCHMARKS.md); a compile or run failure falls back to eager, once
        self._compiled = None
        if compile == "always" or (compile == "auto" and self.device.type == "cuda"):
            self._compiled = torch.compile(self._step, dynamic=True)
        sp = spec.sampling
        self.rule = rule or DegenerationRule(repeat=sp.give_up_repeat, nonword_run=sp.give_up_nonword_run)
        self._flags: tuple[torch.Tensor, torch.Tensor] | None = None

    # -- building blocks (``next_logits`` is the full-prefix reference step; ``_step`` the cached one)

    def encode_images(self, views: torch.Tensor) -> torch.Tensor:
        """uint8 [B,3,S,S] -> the decoder's image tokens [B, T, W]; done once per image."""
        x = views_to_input(views, self.image_size, self.mean, self.std, self.device)
        with torch.inference_mode(), autocast(self.device):
            _, image_embs = self.model._encode_image(x)
        return image_embs

    def next_logits(self, image_embs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Logits [N, vocab] for the token after prefix ``tokens`` [N, t] (full-prefix recompute).

        Same computation as ``CoCa.forward(...)["logits"][:, -1]`` in open_clip's ``generate``
        (``MultimodalTransformer.forward`` unrolled), except that only the last position goes
        through the final norm and the vocabulary projection.
        """
        _, x = self.model.text(tokens)
        dec = self.model.text_decoder
        t = tokens.shape[1]
        for block, cross in zip(dec.resblocks, dec.cross_attn):
            x = block(x, attn_mask=dec.attn_mask[:t, :t])
            x = cross(x, k_x=image_embs, v_x=image_embs)
        return (dec.ln_final(x[:, -1]) @ dec.text_projection).float()

    def decode(
        self,
        image_embs: torch.Tensor,
        uniforms: torch.Tensor | None,
        rows: torch.Tensor | None = None,
        cache: bool | None = None,
    ) -> torch.Tensor:
        """Token ids [N, L] laid out like ``CoCa.generate``: SOT, tokens, EOT, then pad for rows
        that stopped early. ``image_embs`` [B, T, W] from ``encode_images``; ``rows`` [N] the image
        of each caption row (default: one row per image); ``uniforms`` [N, max_len] samples, None
        decodes greedily. ``cache`` picks the KV-cached step (default when supported) or the
        full-prefix reference step; both emit the same tokens up to float rounding."""
        if rows is None:
            rows = torch.arange(image_embs.shape[0], device=image_embs.device)
        rows = rows.to(image_embs.device)
        if uniforms is not None and uniforms.shape != (rows.numel(), self.spec.sampling.max_len):
            raise ValueError(f"uniforms {tuple(uniforms.shape)}, need {(rows.numel(), self.spec.sampling.max_len)}")
        if rows.numel() == 0:
            return torch.full((0, 1), self.sot, dtype=torch.long, device=self.device)
        if self.use_cache if cache is None else cache:
            if self.kv_unsupported:
                raise ValueError(f"captioner '{self.id}': no KV-cached decoding ({self.kv_unsupported})")
            return self._decode_cached(image_embs, rows, uniforms)
        return self._decode_uncached(image_embs[rows], uniforms)

    def _decode_uncached(self, image_embs: torch.Tensor, uniforms: torch.Tensor | None) -> torch.Tensor:
        """The reference loop: one row per image token set in ``image_embs`` [N, T, W]."""
        s = self.spec.sampling
        n, max_len = image_embs.shape[0], s.max_len
        out = torch.full((n, max_len), self.pad, dtype=torch.long, device=self.device)
        out[:, 0] = self.sot
        active = torch.arange(n, device=self.device)
        length = 1
        with torch.inference_mode(), autocast(self.device):
            for t in range(1, max_len):  # t = prefix length = position being filled
                if active.numel() == 0:
                    break
                logits = self.next_logits(image_embs[active], out[active, :t])
                if t < s.min_len:
                    logits[:, self.eot] = float("-inf")
                if t == max_len - 1:  # last slot: forced end, as generate does
                    tok = torch.full_like(active, self.eot)
                else:
                    u = None if uniforms is None else uniforms[active.cpu(), t]
                    tok = pick_tokens(logits, u, s.temperature, s.top_k, s.top_p)
                out[active, t] = tok
                length = t + 1
                active = active[(tok != self.eot) & (tok != self.pad)]  # finished rows stop here
        return out[:, :length]

    # -- the KV-cached path

    def cross_kv(self, image_embs: torch.Tensor) -> torch.Tensor:
        """Cross-attention keys/values of every decoder layer over image tokens [B, T, W]:
        [layers, 2, B, H, T, dh], computed once per image (``ln_1_kv`` then the K/V projections)."""
        out = []
        for block in self.model.text_decoder.cross_attn:
            a = block.attn
            w, h = a.embed_dim, a.num_heads
            bias = a.in_proj_bias[w:] if a.in_proj_bias is not None else None
            kv = F.linear(block.ln_1_kv(image_embs), a.in_proj_weight[w:], bias)
            b, t, _ = kv.shape
            out.append(kv.view(b, t, 2, h, w // h).permute(2, 0, 3, 1, 4))
        return torch.stack(out)

    def _new_cache(self, blocks, n: int, max_len: int, dtype: torch.dtype) -> torch.Tensor:
        a = blocks[0].attn
        # zeros, not empty: a masked position still multiplies its value by 0, and 0 * NaN garbage is NaN
        return torch.zeros(
            len(blocks), 2, n, a.num_heads, max_len, a.embed_dim // a.num_heads, dtype=dtype, device=self.device
        )

    def _step(
        self,
        tok: torch.Tensor,
        pos: _Positions | int,
        text_cache: torch.Tensor,
        dec_cache: torch.Tensor,
        cross: torch.Tensor,
        groups: _Groups,
    ) -> torch.Tensor:
        """Logits [n, vocab] after feeding token ``tok`` [n] at positions ``pos`` (caches hold the
        earlier ones). Python work per step: one loop over layers, nothing per head or per row."""
        if isinstance(pos, int):
            pos = _Positions(torch.full_like(tok, pos))
        text, dec = self.model.text, self.model.text_decoder
        cast = text.transformer.get_cast_dtype()
        pe = text.positional_embedding[pos.same] if pos.same is not None else text.positional_embedding[pos.p]
        x = text.token_embedding(tok).to(cast) + pe.to(cast)
        for i, block in enumerate(text.transformer.resblocks):
            x = _self_attn_step(block, x, text_cache[i], pos)
        if text.cls_emb is None:  # without a cls token the tower's tokens are normed
            x = text.ln_final(x)
        for i, (block, cross_block) in enumerate(zip(dec.resblocks, dec.cross_attn)):
            x = _self_attn_step(block, x, dec_cache[i], pos)
            x = _cross_attn_step(cross_block, x, cross[i], groups)
        return (dec.ln_final(x) @ dec.text_projection).float()

    def _run_step(self, *args) -> torch.Tensor:
        if self._compiled is not None:
            try:
                return self._compiled(*args)
            except Exception as e:  # noqa: BLE001 - any compiler failure: the eager step is exact
                log.warning("captioner '%s': compiled decoder step failed (%s); decoding eagerly", self.id, e)
                self._compiled = None
        return self._step(*args)

    def _decode_cached(
        self, image_embs: torch.Tensor, rows: torch.Tensor, uniforms: torch.Tensor | None, draws: _Draws | None = None
    ) -> torch.Tensor:
        """The batched KV-cached loop over batch slots, each decoding one draw into its own token
        buffer ``seq`` (compacted with the caches). Without ``draws`` slot i decodes output row i.
        With ``draws`` (caption()'s bookkeeping) a slot whose draw is given up restarts at position 0
        with its row's next draw, and free slots may start next draws early (``speculate_rows``);
        a restarted slot keeps its image tokens and cross-attention K/V, only its own self-attention
        cache is overwritten (masked beyond its position)."""
        s = self.spec.sampling
        n, max_len = rows.numel(), s.max_len
        dev = self.device
        out = torch.full((n, max_len), self.pad, dtype=torch.long, device=dev)
        out[:, 0] = self.sot
        seq = out.clone()
        text, dec = self.model.text, self.model.text_decoder
        u = None if uniforms is None else uniforms.to(dev)
        want = min(n, self.speculate_rows)
        length = 1
        with torch.inference_mode(), autocast(dev):
            used, img = torch.unique(rows, return_inverse=True)
            cross = self.cross_kv(image_embs[used])  # once per image, not per caption
            groups = _Groups(img, cross.shape[2])
            dtype = cross.dtype
            text_cache = self._new_cache(text.transformer.resblocks, n, max_len, dtype)
            dec_cache = self._new_cache(dec.resblocks, n, max_len, dtype)
            idx = torch.arange(n, device=dev)  # batch slot -> output row
            draw = torch.zeros(n, dtype=torch.long, device=dev)  # batch slot -> its row's draw
            steps = torch.zeros(n, dtype=torch.long, device=dev)  # steps of the slot's current draw
            p = torch.zeros(n, dtype=torch.long, device=dev)  # position each slot feeds next
            alive = torch.ones(n, dtype=torch.bool, device=dev)
            since = 0
            while True:
                pos = _Positions(p)
                slots = torch.arange(len(idx), device=dev)
                logits = self._run_step(seq[slots, p], pos, text_cache, dec_cache, cross, groups)
                t = p + 1  # position being filled
                steps += alive
                short = t < s.min_len
                if bool(short.any()):
                    logits[short, self.eot] = float("-inf")
                tok = pick_tokens(logits, None if u is None else u[slots, t], s.temperature, s.top_k, s.top_p)
                was = alive
                seq[slots[was], t[was]] = tok[was]
                done = (tok == self.eot) | (tok == self.pad)
                last = (t == max_len - 2) & ~done & was  # next slot is the forced end: no forward for it
                seq[slots[last], max_len - 1] = self.eot
                done = (done | last) & was
                alive = was & ~done
                p = torch.where(alive, t, p)  # finished slots idle in place until compacted
                if draws is None:
                    out[idx[done]] = seq[done]
                    if bool(done.any()):
                        length = max(length, max_len if bool(last.any()) else int(t[done].max()) + 1)
                else:
                    start, stop = draws.review(self, seq, idx, draw, t, tok, was, done)
                    alive &= ~stop
                    restart = torch.zeros_like(was)
                    restart[_ids([x[0] for x in start], dev)] = True
                    ended = (was & ~alive) | restart  # draws that ended (or were discarded) in their slot
                    draws.count_steps(idx[ended], draw[ended], steps[ended])
                    alive |= restart
                    start += draws.speculate((~alive).nonzero().squeeze(1).tolist(), idx, alive, want)
                    if start:  # (re)start draws in those slots
                        sl, r, b = (_ids(c, dev) for c in zip(*start))
                        img[sl] = img[_first_slot_of(idx, r)]  # the row's image (it has a draw running)
                        idx[sl], draw[sl] = r, b
                        seq[sl, 1:], p[sl], steps[sl], alive[sl] = self.pad, 0, 0, True
                        if u is not None:
                            u[sl] = draws.uniforms(r.tolist(), b.tolist()).to(u)
                        groups = _Groups(img, cross.shape[2])
                n_alive = int(alive.sum())
                if n_alive == 0:
                    break
                dead, since = len(idx) - n_alive, since + 1
                if dead and (dead >= self.compact_fraction * len(idx) or since >= self.compact_every):
                    keep = alive.nonzero().squeeze(1)  # finished slots stop costing compute
                    idx, img, p, draw, steps, seq = idx[keep], img[keep], p[keep], draw[keep], steps[keep], seq[keep]
                    if u is not None:
                        u = u[keep]
                    text_cache = text_cache.index_select(2, keep)
                    dec_cache = dec_cache.index_select(2, keep)
                    used, img = torch.unique(img, return_inverse=True)
                    if used.numel() < cross.shape[2]:
                        cross = cross.index_select(2, used)
                    groups = _Groups(img, cross.shape[2])
                    alive = torch.ones(len(idx), dtype=torch.bool, device=dev)
                    since = 0
        return out[:, :length]

    def token_flags(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per vocabulary id: does the token end a word, does it end a sentence (a "." then a
        space once decoded: ``clean_caption`` cuts there, so nothing after it matters). A
        tokenizer without a BPE table gets "every token may end a word, none ends a sentence"."""
        if self._flags is None:
            vocab = self.model.text_decoder.text_projection.shape[-1]
            table = getattr(self.tokenizer, "decoder", None)
            if isinstance(table, dict):
                pieces = [table.get(i, "") for i in range(vocab)]
                word = torch.tensor([p.endswith("</w>") for p in pieces])
                sentence = torch.tensor([p.endswith(".</w>") for p in pieces])
            else:
                word, sentence = torch.ones(vocab, dtype=torch.bool), torch.zeros(vocab, dtype=torch.bool)
            self._flags = (word.to(self.device), sentence.to(self.device))
        return self._flags

    def text_of(self, row: torch.Tensor) -> str:
        ids = row.tolist()[1:]
        for stop in (self.eot, self.pad):
            if stop in ids:
                ids = ids[: ids.index(stop)]
        return clean_caption(self.tokenizer.decode(ids))

    # -- the public entry point

    def caption(self, views: torch.Tensor, keys: list[str], seed: int, k: int, greedy: bool = False) -> CaptionBatch:
        """Up to k clean captions per image. An empty/degenerate draw is redrawn with attempt+1
        (at most ``sampling.max_attempts`` draws per caption), then dropped; every rejected draw
        is counted in ``rejected`` by reason. Greedy (or temperature 0) draws once, unseeded.

        With the KV cache all rows decode in one batch (or ``decode_batch``-row chunks of whole
        images) and a draw is judged while it is decoded (``rule``; a sentence end ends it, since
        cleaning drops the rest): a given-up draw restarts in its own slot, so a redraw costs
        that row's steps only, and while few rows are left, free slots start rows' next draws
        early (``speculate_rows``). Captions are a function of (seed, key, caption index) alone."""
        if len(keys) != views.shape[0]:
            raise ValueError(f"{len(keys)} keys for {views.shape[0]} views")
        s = self.spec.sampling
        greedy = greedy or s.temperature == 0
        if k == 0 or not keys:
            return CaptionBatch([[] for _ in keys])
        image_embs = self.encode_images(views)
        pairs = [(i, j) for i in range(len(keys)) for j in range(k)]
        draws = _Draws(
            self, [keys[i] for i, _ in pairs], [j for _, j in pairs], seed, 1 if greedy else s.max_attempts, greedy
        )
        if self.use_cache:
            per = max(1, self.decode_batch // k) * k if self.decode_batch else len(pairs)
            for lo in range(0, len(pairs), per):  # whole images per chunk; rows never interact
                rows = torch.tensor([i for i, _ in pairs[lo : lo + per]], device=self.device)
                sub = draws.part(lo, lo + per)
                u = None if greedy else sub.uniforms(list(range(len(sub))))
                self._decode_cached(image_embs, rows, u, sub)
                draws.merge(sub, lo)
        else:
            self._caption_by_passes(image_embs, pairs, draws)
        if not all(draws.decided):  # an invariant of the loop: never return a silently short batch
            raise RuntimeError(f"captioner '{self.id}': {draws.decided.count(False)} caption rows left undecided")
        captions: list[list[str]] = [[] for _ in keys]
        for (i, _), text in zip(pairs, draws.text):
            if text is not None:
                captions[i].append(text)
        return CaptionBatch(
            captions,
            draws.rejected,
            attempts=sum(a + 1 for a in draws.attempt),
            resampled=sum(draws.attempt),
            row_steps=draws.row_steps,
            wasted_row_steps=draws.wasted_row_steps,
            speculated=draws.speculated,
        )

    def _caption_by_passes(self, image_embs: torch.Tensor, pairs: list[tuple[int, int]], draws: _Draws) -> None:
        """Reference path (no KV cache): decode every pending row to the end, judge, redraw the
        rejected ones in another full pass. Same captions as the single-pass loop."""
        pending = [(r, 0) for r in range(len(pairs))]
        while pending:
            rows = torch.tensor([pairs[r][0] for r, _ in pending], device=self.device)
            u = None if draws.greedy else draws.uniforms(*map(list, zip(*pending)))
            tokens = self.decode(image_embs, u, rows=rows, cache=False).cpu()
            draws.row_steps += int((tokens[:, 1:] != self.pad).sum())
            for (r, a), row in zip(pending, tokens):
                draws.judge(r, a, self.text_of(row))
            pending = [(r, b) for r, _ in pending if (b := draws.next_draw(r)) is not None]

    def __repr__(self) -> str:
        return f"Captioner({self.id!r}, {self.spec.model}, size={self.image_size})"


def load_captioner(
    spec: CaptionerSpec,
    ensemble: EnsembleSpec,
    device: str = "cpu",
    decode_batch: int = 0,
    speculate_rows: int = -1,
    compile: str = "auto",
) -> Captioner:
    """``decode_batch``, ``speculate_rows``, ``compile``: the ``execution.caption_*`` settings;
    they change the cost of captioning, never its captions (compile: up to float rounding)."""
    model = load_model("captioner", spec, ensemble, device)
    tokenizer = open_clip.get_tokenizer(spec.model)
    return Captioner(
        spec, model, tokenizer, device, decode_batch=decode_batch, speculate_rows=speculate_rows, compile=compile
    )
