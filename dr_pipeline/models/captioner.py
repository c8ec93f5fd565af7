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


@dataclass
class CaptionBatch:
    captions: list[list[str]]      # per image: up to k clean captions, in caption-index order
    rejected: collections.Counter = field(default_factory=collections.Counter)  # reason -> rejected samples
    resampled: int = 0             # caption rows redrawn after a degenerate draw (marker: captions_resampled)


# --------------------------------------------------------------------------- text hygiene

_SENTENCE_END = re.compile(r"\.(\s|$)")


def clean_caption(text: str) -> str:
    """Drop special tokens and anything after end-of-text, cut at the first sentence end, tidy spaces."""
    text = text.split(EOT, 1)[0].replace(SOT, " ")
    m = _SENTENCE_END.search(text)          # "3.5 m" is no sentence end; "left . a" is
    if m:
        text = text[:m.start()]
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


# --------------------------------------------------------------------------- seeded uniforms

def row_uniforms(seed: int, key: str, index: int, attempt: int, n: int, salt: str = "") -> np.ndarray:
    """n uniforms in [0, 1) for one caption row, a pure function of its identity."""
    digest = hashlib.sha256(f"caption\x00{salt}\x00{seed}\x00{key}\x00{index}\x00{attempt}".encode()).digest()
    bits = np.random.Philox(key=np.frombuffer(digest[:16], dtype="<u8")).random_raw(n)
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0 ** -53   # top 53 bits, like random()


def _nucleus_threshold(vals: torch.Tensor, top_p: float) -> torch.Tensor:
    """[N, 1] smallest kept probability, from each row's probabilities sorted descending."""
    inside = (vals.cumsum(dim=-1) - vals) < top_p        # smallest prefix reaching top_p
    return vals.gather(1, inside.sum(dim=-1, keepdim=True) - 1)


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """[N, 1] index of the token each row's uniform falls on, CDF in the given column order."""
    cdf = probs.double().cumsum(dim=-1)
    target = (u.to(cdf) * cdf[:, -1]).unsqueeze(1)
    choice = torch.searchsorted(cdf, target, right=True)
    # u * total may round up to total: never step past the last token with mass.
    last = probs.shape[-1] - 1 - (probs > 0).flip(-1).int().argmax(dim=-1, keepdim=True)
    return torch.minimum(choice, last)


def pick_tokens(logits: torch.Tensor, u: torch.Tensor | None, temperature: float, top_k: int,
                top_p: float, prefilter: int = 256) -> torch.Tensor:
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
    rows = torch.arange(probs.shape[0], device=probs.device)      # rows still to pick
    if top_p < 1.0 or 0 < top_k <= prefilter:
        for m in sorted({min(32, prefilter), prefilter}):
            if m >= vocab or rows.numel() == 0:
                break
            vals, ids = probs[rows].topk(m, dim=-1)
            ok = torch.ones_like(rows, dtype=torch.bool)
            if top_p < 1.0:
                ok = (vals.cumsum(dim=-1) - vals)[:, -1] >= top_p     # the nucleus ends inside
                vals = vals * (vals >= _nucleus_threshold(vals, top_p))
            ok &= vals[:, -1] == 0                                    # every kept token is a candidate
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


def _self_attn_step(block: ResidualAttentionBlock, x: torch.Tensor, cache: torch.Tensor, p: int) -> torch.Tensor:
    """One residual block for the newest position ``p`` only; x [n, W]; cache [2, n, H, L, dh]
    holds the keys/values of positions < p and receives those of p. Same math as the block's
    causal forward (pre-norm, MHA via SDPA, LayerScale, MLP) restricted to the last query."""
    a = block.attn
    n, w = x.shape
    h = a.num_heads
    qkv = F.linear(block.ln_1(x), a.in_proj_weight, a.in_proj_bias).view(n, 3, h, w // h)
    cache[0, :, :, p] = qkv[:, 1]
    cache[1, :, :, p] = qkv[:, 2]
    o = F.scaled_dot_product_attention(qkv[:, 0].unsqueeze(2), cache[0, :, :, :p + 1], cache[1, :, :, :p + 1])
    x = x + block.ls_1(a.out_proj(o.reshape(n, w)))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


class _Groups:
    """Caption rows grouped by image for cross-attention: row r is query ``slot[r]`` of image
    ``img[r]``; queries [n, H, dh] scatter to [B_img, H, k_max, dh] against the per-image K/V."""

    def __init__(self, img: torch.Tensor) -> None:
        n = img.numel()
        order = torch.argsort(img, stable=True)
        s = img[order]
        slot = torch.empty_like(img)
        slot[order] = torch.arange(n, device=img.device) - torch.searchsorted(s, s)
        self.img, self.slot, self.n = img, slot, n
        self.n_img, self.k_max = int(s[-1]) + 1, int(slot.max()) + 1
        # rows laid out image-major without holes (the usual case before any row finishes): views only
        self.dense = n == self.n_img * self.k_max and bool(
            (img * self.k_max + slot == torch.arange(n, device=img.device)).all())

    def scatter(self, q: torch.Tensor) -> torch.Tensor:
        _, h, dh = q.shape
        if self.dense:
            return q.view(self.n_img, self.k_max, h, dh).transpose(1, 2)
        out = q.new_zeros(self.n_img, self.k_max, h, dh)
        out[self.img, self.slot] = q
        return out.transpose(1, 2)

    def gather(self, o: torch.Tensor) -> torch.Tensor:
        o = o.transpose(1, 2)                               # [B_img, k_max, H, dh]
        if self.dense:
            return o.reshape(self.n, -1)
        return o[self.img, self.slot].reshape(self.n, -1)


def _cross_attn_step(block: ResidualAttentionBlock, x: torch.Tensor, kv: torch.Tensor, groups: _Groups) -> torch.Tensor:
    """Cross-attention block for the newest position; kv [2, B_img, H, T, dh] precomputed per image."""
    a = block.attn
    n, w = x.shape
    h = a.num_heads
    bias = a.in_proj_bias[:w] if a.in_proj_bias is not None else None
    q = F.linear(block.ln_1(x), a.in_proj_weight[:w], bias).view(n, h, w // h)
    o = groups.gather(F.scaled_dot_product_attention(groups.scatter(q), kv[0], kv[1]))
    x = x + block.ls_1(a.out_proj(o))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


# --------------------------------------------------------------------------- captioner

class Captioner:
    """A frozen CoCa model with a batched, seeded decoding loop."""

    def __init__(self, spec: CaptionerSpec, model: torch.nn.Module, tokenizer, device: str = "cpu") -> None:
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
        self.compact_every = 4     # compact finished rows out at least this often (steps) ...
        self.compact_fraction = 0.125   # ... or as soon as this share of the batch has finished

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

    def decode(self, image_embs: torch.Tensor, uniforms: torch.Tensor | None,
               rows: torch.Tensor | None = None, cache: bool | None = None) -> torch.Tensor:
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
            for t in range(1, max_len):          # t = prefix length = position being filled
                if active.numel() == 0:
                    break
                logits = self.next_logits(image_embs[active], out[active, :t])
                if t < s.min_len:
                    logits[:, self.eot] = float("-inf")
                if t == max_len - 1:             # last slot: forced end, as generate does
                    tok = torch.full_like(active, self.eot)
                else:
                    u = None if uniforms is None else uniforms[active.cpu(), t]
                    tok = pick_tokens(logits, u, s.temperature, s.top_k, s.top_p)
                out[active, t] = tok
                length = t + 1
                active = active[(tok != self.eot) & (tok != self.pad)]   # finished rows stop here
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
        return torch.empty(len(blocks), 2, n, a.num_heads, max_len, a.embed_dim // a.num_heads,
                           dtype=dtype, device=self.device)

    def _step(self, tok: torch.Tensor, p: int, text_cache: torch.Tensor, dec_cache: torch.Tensor,
              cross: torch.Tensor, groups: _Groups) -> torch.Tensor:
        """Logits [n, vocab] after feeding token ``tok`` [n] at position ``p`` (caches hold < p)."""
        text, dec = self.model.text, self.model.text_decoder
        cast = text.transformer.get_cast_dtype()
        x = text.token_embedding(tok).to(cast) + text.positional_embedding[p].to(cast)
        for i, block in enumerate(text.transformer.resblocks):
            x = _self_attn_step(block, x, text_cache[i], p)
        if text.cls_emb is None:             # without a cls token the tower's tokens are normed
            x = text.ln_final(x)
        for i, (block, cross_block) in enumerate(zip(dec.resblocks, dec.cross_attn)):
            x = _self_attn_step(block, x, dec_cache[i], p)
            x = _cross_attn_step(cross_block, x, cross[i], groups)
        return (dec.ln_final(x) @ dec.text_projection).float()

    def _decode_cached(self, image_embs: torch.Tensor, rows: torch.Tensor,
                       uniforms: torch.Tensor | None) -> torch.Tensor:
        s = self.spec.sampling
        n, max_len = rows.numel(), s.max_len
        out = torch.full((n, max_len), self.pad, dtype=torch.long, device=self.device)
        out[:, 0] = self.sot
        text, dec = self.model.text, self.model.text_decoder
        u_all = None if uniforms is None else uniforms.to(self.device)
        length = 1
        with torch.inference_mode(), autocast(self.device):
            used, img = torch.unique(rows, return_inverse=True)
            cross = self.cross_kv(image_embs[used])           # once per image, not per caption
            groups = _Groups(img)
            dtype = cross.dtype
            text_cache = self._new_cache(text.transformer.resblocks, n, max_len, dtype)
            dec_cache = self._new_cache(dec.resblocks, n, max_len, dtype)
            idx = torch.arange(n, device=self.device)          # batch position -> output row
            alive = torch.ones(n, dtype=torch.bool, device=self.device)
            since = 0
            for t in range(1, max_len):          # t = prefix length = position being filled
                if t == max_len - 1:             # last slot: forced end, as generate does (no forward)
                    out[idx[alive], t] = self.eot
                    length = max_len
                    break
                logits = self._step(out[idx, t - 1], t - 1, text_cache, dec_cache, cross, groups)
                if t < s.min_len:
                    logits[:, self.eot] = float("-inf")
                u = None if u_all is None else u_all[idx, t]
                tok = pick_tokens(logits, u, s.temperature, s.top_k, s.top_p)
                out[idx[alive], t] = tok[alive]
                length = t + 1
                alive &= (tok != self.eot) & (tok != self.pad)
                n_alive = int(alive.sum())
                if n_alive == 0:
                    break
                dead, since = len(idx) - n_alive, since + 1
                if dead and (dead >= self.compact_fraction * len(idx) or since >= self.compact_every):
                    keep = alive.nonzero().squeeze(1)             # finished rows stop costing compute
                    idx, img = idx[keep], img[keep]
                    text_cache = text_cache.index_select(2, keep)
                    dec_cache = dec_cache.index_select(2, keep)
                    used, img = torch.unique(img, return_inverse=True)
                    if used.numel() < cross.shape[2]:
                        cross = cross.index_select(2, used)
                    groups = _Groups(img)
                    alive = torch.ones(len(idx), dtype=torch.bool, device=self.device)
                    since = 0
        return out[:, :length]

    def text_of(self, row: torch.Tensor) -> str:
        ids = row.tolist()[1:]
        for stop in (self.eot, self.pad):
            if stop in ids:
                ids = ids[:ids.index(stop)]
        return clean_caption(self.tokenizer.decode(ids))

    # -- the public entry point

    def caption(self, views: torch.Tensor, keys: list[str], seed: int, k: int,
                greedy: bool = False) -> CaptionBatch:
        """Up to k clean captions per image. Empty/degenerate samples are redrawn with attempt+1
        (at most ``sampling.max_attempts`` draws per caption), then dropped; every rejected draw
        is counted in ``rejected`` by reason. Greedy (or temperature 0) decodes once, unseeded."""
        if len(keys) != views.shape[0]:
            raise ValueError(f"{len(keys)} keys for {views.shape[0]} views")
        s = self.spec.sampling
        greedy = greedy or s.temperature == 0
        captions: list[list[str | None]] = [[None] * k for _ in keys]
        rejected: collections.Counter = collections.Counter()
        if k == 0 or not keys:
            return CaptionBatch([[] for _ in keys], rejected)
        image_embs = self.encode_images(views)
        pending = [(i, j) for i in range(len(keys)) for j in range(k)]
        for attempt in range(1 if greedy else s.max_attempts):
            if not pending:
                break
            rows = torch.tensor([i for i, _ in pending], device=self.device)
            u = None if greedy else torch.from_numpy(np.stack(
                [row_uniforms(seed, keys[i], j, attempt, s.max_len, self.id) for i, j in pending]))
            tokens = self.decode(image_embs, u, rows=rows).cpu()
            still: list[tuple[int, int]] = []
            for (i, j), row in zip(pending, tokens):
                text = self.text_of(row)
                reason = "empty" if not text else "degenerate" if is_degenerate(text) else None
                if reason:
                    rejected[reason] += 1
                    still.append((i, j))
                else:
                    captions[i][j] = text
            pending = still
        return CaptionBatch([[c for c in caps if c is not None] for caps in captions], rejected)

    def __repr__(self) -> str:
        return f"Captioner({self.id!r}, {self.spec.model}, size={self.image_size})"


def load_captioner(spec: CaptionerSpec, ensemble: EnsembleSpec, device: str = "cpu") -> Captioner:
    model = load_model("captioner", spec, ensemble, device)
    return Captioner(spec, model, open_clip.get_tokenizer(spec.model), device)
