"""The FOD objective: reconstruction, correlation divergences and entropy, two phases."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fod_core.kernels import split_divergence_entropy
from fod_core.model import AttentionMaps, LevelOutput, rbf_target_dense


def kl_divergence(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """KL(p||q) over the last dim, as the method defines it (eps inside both logs)."""
    return (p * (torch.log(p + eps) - torch.log(q + eps))).sum(-1)


def entropy(p: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """-sum p log(p + eps) over the last dim."""
    return -(p * torch.log(p + eps)).sum(-1)


def reconstruction_loss(target: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """MSE plus mean cosine distance over channels."""
    cosine = F.cosine_similarity(reconstruction, target, dim=-1)
    return F.mse_loss(reconstruction, target) + (1 - cosine).mean()


@dataclass
class LossTerms:
    """One level's objective; ``phase1``/``phase2`` carry the stop-gradient split."""

    reconstruction: torch.Tensor
    intra_divergence: torch.Tensor
    inter_divergence: torch.Tensor
    intra_entropy: torch.Tensor
    inter_entropy: torch.Tensor
    phase1: torch.Tensor
    phase2: torch.Tensor

    def as_floats(self) -> dict[str, float]:
        return {k: float(v.detach()) for k, v in vars(self).items()}


def _phase_terms(maps: Sequence[AttentionMaps], eps: float):
    """Mean over layers, batch, heads and tokens of D(T,sg S), D(sg T,S) and E(S)."""
    terms = [
        m.terms
        if m.terms is not None
        else split_divergence_entropy(m.target_rows, m.target_cols, m.correlation, eps)
        for m in maps
    ]
    return [torch.stack(column).mean() for column in zip(*terms, strict=True)]


def _combine(rec, intra, inter, lambda1: float, lambda2: float) -> LossTerms:
    (intra_t, intra_s, intra_ent), (inter_t, inter_s, inter_ent) = intra, inter
    phase1 = rec + lambda1 * intra_t - lambda1 * inter_t
    phase2 = rec - lambda1 * intra_s - lambda2 * intra_ent + lambda1 * inter_s + lambda2 * inter_ent
    return LossTerms(
        reconstruction=rec,
        intra_divergence=intra_t.detach(),
        inter_divergence=inter_t.detach(),
        intra_entropy=intra_ent.detach(),
        inter_entropy=inter_ent.detach(),
        phase1=phase1,
        phase2=phase2,
    )


def fod_objective(output: LevelOutput, *, lambda1: float, lambda2: float, eps: float) -> LossTerms:
    """The two phases of the method (minimax with stop-gradients):

    L1 = rec + l1 Div_intra(T, sg S) - l1 Div_inter(T, sg S)             (trains sigmas)
    L2 = rec - l1 Div_intra(sg T, S) - l2 Ent(S_intra)
             + l1 Div_inter(sg T, S) + l2 Ent(S_inter)                   (trains attention)

    Backpropagating L1 + L2 once gives the same gradients as backward(L1) then
    backward(L2) before one optimiser step.
    """
    rec = reconstruction_loss(output.tokens.float(), output.reconstruction.float())
    intra = _phase_terms(output.intra, eps)
    inter = _phase_terms(output.inter, eps)
    return _combine(rec, intra, inter, lambda1, lambda2)


def reference_objective(
    output: LevelOutput, *, lambda1: float, lambda2: float, eps: float
) -> LossTerms:
    """The same objective computed as the reference does: a dense target, separate
    KL terms with explicit ``detach``. Used by the baseline benchmark and the tests."""
    rec = reconstruction_loss(output.tokens.float(), output.reconstruction.float())

    def terms(maps: Sequence[AttentionMaps]):
        div_t, div_s, ent = [], [], []
        for m in maps:
            grid = (m.target_rows.shape[-1], m.target_cols.shape[-1])
            target, corr = rbf_target_dense(m.sigma, grid), m.correlation
            div_t.append(
                (
                    kl_divergence(target, corr.detach(), eps)
                    + kl_divergence(corr.detach(), target, eps)
                ).mean()
            )
            div_s.append(
                (
                    kl_divergence(target.detach(), corr, eps)
                    + kl_divergence(corr, target.detach(), eps)
                ).mean()
            )
            ent.append(entropy(corr, eps).mean())
        return [torch.stack(column).mean() for column in (div_t, div_s, ent)]

    return _combine(rec, terms(output.intra), terms(output.inter), lambda1, lambda2)


def total_objective(terms: Sequence[LossTerms]) -> torch.Tensor:
    """Sum over levels of L1 + L2: one backward pass for both phases of every level."""
    return torch.stack([t.phase1 + t.phase2 for t in terms]).sum()
