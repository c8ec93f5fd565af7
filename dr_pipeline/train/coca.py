"""CoCa students: open_clip ``CoCa``'s captioning loss, over a restricted vocabulary.

``loss.caption_weight`` adds ``w · CE(decoder(image tokens, GT tokens[:-1]), GT tokens[1:])``
to the contrastive loss, as open_clip's ``CoCaLoss`` does (pad ignored). With
``loss.caption_vocab`` (the token ids the captions use; ~60 for the synthetic domain) the
decoder's projection columns of every other token are set to zero at initialisation and held
there (the restricted form does not touch them). Their logits are exactly 0, so the n_other
of them weigh n_other·e⁰ in the softmax: one extra logit log(n_other). The cross-entropy over
(vocabulary logits, that lumped logit) equals the full-vocabulary cross-entropy at those
weights, value and every other gradient, at |vocab| / 49,408 of the projection's cost: it is
full-vocabulary training with the unused columns frozen at zero. A caption token outside the
vocabulary is scored as the lumped class.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def is_coca(model: nn.Module) -> bool:
    return hasattr(model, "text_decoder") and hasattr(model, "_encode_image")


def init_decoder(model: nn.Module, vocab: torch.Tensor | None) -> None:
    """What open_clip's ``MultimodalTransformer.init_parameters`` means to do (it initialises
    nothing of the decoder's blocks), and the projection columns outside ``vocab`` zeroed."""
    dec = model.text_decoder
    w = dec.width
    proj_std, attn_std, fc_std = (w**-0.5) * ((2 * dec.layers) ** -0.5), w**-0.5, (2 * w) ** -0.5
    with torch.no_grad():
        for block in [*dec.resblocks, *dec.cross_attn]:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(dec.text_projection, std=w**-0.5)
        if vocab is not None:
            keep = torch.zeros(dec.text_projection.shape[1], dtype=torch.bool)
            keep[vocab] = True
            dec.text_projection[:, ~keep] = 0.0


def decoder_hidden(model: nn.Module, image_embs: torch.Tensor, token_embs: torch.Tensor) -> torch.Tensor:
    """``MultimodalTransformer.forward`` without the final vocabulary projection."""
    dec = model.text_decoder
    t = token_embs.shape[1]
    x = token_embs
    for block, cross in zip(dec.resblocks, dec.cross_attn):
        x = block(x, attn_mask=dec.attn_mask[:t, :t])
        x = cross(x, k_x=image_embs, v_x=image_embs)
    return dec.ln_final(x)


class CaptionLoss(nn.Module):
    """Cross-entropy of the decoder's next-token logits against the caption tokens (pad 0
    ignored); over ``vocab`` plus one lumped class when a vocabulary is given."""

    def __init__(self, n_vocab: int, vocab: tuple[int, ...] | None):
        super().__init__()
        self.vocab = None if vocab is None else torch.tensor(sorted(set(vocab)), dtype=torch.long)
        if self.vocab is not None:
            remap = torch.full((n_vocab,), len(self.vocab), dtype=torch.long)  # others -> the lump
            remap[self.vocab] = torch.arange(len(self.vocab))
            remap[0] = -100
            self.remap = remap
            self.log_other = math.log(n_vocab - len(self.vocab))

    def forward(self, model: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        proj = model.text_decoder.text_projection
        if self.vocab is None:
            logits = hidden @ proj
            return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=0)
        logits = hidden @ proj[:, self.vocab.to(proj.device)]
        lump = torch.full_like(logits[..., :1], self.log_other)
        logits = torch.cat([logits, lump], dim=-1)
        target = self.remap.to(labels.device)[labels]
        return F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100)


def domain_vocab(token_rows: torch.Tensor) -> tuple[int, ...]:
    """The token ids (pad excluded) that rows of caption tokens use."""
    ids = torch.unique(token_rows)
    return tuple(int(i) for i in ids[ids != 0])
