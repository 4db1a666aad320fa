"""Accuracy of a variant against the reference, teacher-forced on encoded evaluation samples.

Next-token KL divergence is taken on the answer tokens only (`answer_mask` from `encode_sample`): that is where
the model is predicting content rather than echoing the prompt. The vision path is compared on its own, as the
cosine similarity of the resampler outputs (one 64-query block per image slice or temporal group).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F


def token_kl(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(reference ‖ variant) per position, in nats, computed in float32: `[..., vocab]` → `[...]`. Clamped at 0:
    KL is never negative, and rounding would otherwise make identical distributions print as -0.00000."""
    ref = F.log_softmax(reference_logits.float(), dim=-1)
    var = F.log_softmax(logits.float(), dim=-1)
    return (ref.exp() * (ref - var)).sum(-1).clamp_min(0.0)


def slice_cosines(reference: torch.Tensor, variant: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each vision block `[G, queries, hidden]` (flattened per block) → `[G]`."""
    return F.cosine_similarity(reference.float().flatten(1), variant.float().flatten(1), dim=-1)


@torch.no_grad()
def compare_models(reference, variant, samples: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Mean and p99 answer-token KL, top-1 agreement, and mean vision cosine of `variant` against `reference`.

    Logits are aligned as next-token predictions: position t scores token t+1, counted when t+1 is an answer token.
    """
    kls, agree, cosines = [], [], []
    for data in samples:
        mask = data["answer_mask"][:, 1:].bool()
        inputs = {k: v for k, v in data.items() if k != "answer_mask"}
        ref_logits = reference(dict(inputs)).logits[:, :-1]
        var_logits = variant(dict(inputs)).logits[:, :-1]
        if mask.any():
            kls.append(token_kl(ref_logits, var_logits)[mask])
            agree.append((ref_logits.argmax(-1) == var_logits.argmax(-1))[mask].float())
        if any(len(p) for p in inputs.get("pixel_values") or []):
            for ref_vision, var_vision in zip(reference._vision_states_per_sample(inputs),
                                              variant._vision_states_per_sample(inputs)):
                if len(ref_vision):
                    cosines.append(slice_cosines(ref_vision, var_vision))
    kl = torch.cat(kls) if kls else torch.zeros(0)
    return {
        "kl_mean": kl.mean().item() if len(kl) else float("nan"),
        "kl_p99": torch.quantile(kl, 0.99).item() if len(kl) else float("nan"),
        "top1_agreement": torch.cat(agree).mean().item() if agree else float("nan"),
        "vision_cosine": torch.cat(cosines).mean().item() if cosines else float("nan"),
        "answer_tokens": int(len(kl)),
    }
