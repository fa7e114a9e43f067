"""Fused math over every (query, key) pair: the RBF target, its divergence to the
learned correlation, and the correlation's entropy.

These L x L element-wise terms, not the matrix products, dominate FOD's cost: at
256x256 input the first level has 1024 tokens, so each head of each attention holds
a million pairs. Written as one expression over the separable target factors, the
target is never materialised, and ``torch.compile`` turns forward and backward each
into a single loop. Without a working compiler the same code runs eagerly.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)


def outer_target(ty: torch.Tensor, tx: torch.Tensor) -> torch.Tensor:
    """T (..., H*W) from its row factor (..., H) and column factor (..., W)."""
    return (ty[..., :, None] * tx[..., None, :]).flatten(-2)


def divergence_entropy_forward(
    ty: torch.Tensor, tx: torch.Tensor, corr: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """D = sum_j (T-S)(log(T+e) - log(S+e)) = KL(T||S) + KL(S||T); E = -sum_j S log(S+e)."""
    target = outer_target(ty, tx)
    log_corr = torch.log(corr + eps)
    divergence = ((target - corr) * (torch.log(target + eps) - log_corr)).sum(-1)
    entropy = -(corr * log_corr).sum(-1)
    return divergence, entropy


def divergence_forward(
    ty: torch.Tensor, tx: torch.Tensor, corr: torch.Tensor, eps: float
) -> tuple[torch.Tensor]:
    """D alone, as sum_j (T-S) log((T+e)/(S+e)): one logarithm per pair instead of two,
    and no log(S+e) buffer (that is kept only to share with the entropy)."""
    target = outer_target(ty, tx)
    return (((target - corr) * torch.log((target + eps) / (corr + eps))).sum(-1),)


def divergence_entropy_backward(
    ty: torch.Tensor,
    tx: torch.Tensor,
    corr: torch.Tensor,
    grad_div_target: torch.Tensor,
    grad_div_corr: torch.Tensor,
    grad_entropy: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients to (ty, tx, corr); D's gradient to T and to S arrive separately."""
    height, width = ty.shape[-1], tx.shape[-1]
    target = outer_target(ty, tx)
    log_corr = torch.log(corr + eps)
    log_ratio = torch.log(target + eps) - log_corr
    diff = target - corr
    grad_target = grad_div_target[..., None] * (log_ratio + diff / (target + eps))
    grad_corr = -grad_div_corr[..., None] * (log_ratio + diff / (corr + eps)) - grad_entropy[
        ..., None
    ] * (log_corr + corr / (corr + eps))
    grad_target = grad_target.unflatten(-1, (height, width))
    grad_ty = (grad_target * tx[..., None, :]).sum(-1)
    grad_tx = (grad_target * ty[..., :, None]).sum(-2)
    return grad_ty, grad_tx, grad_corr


_compiled: dict[str, Callable] = {}
_compile_lock = threading.Lock()
_compile_failed = False


def compile_enabled() -> bool:
    """FOD_COMPILE=0 turns the compiled kernels off (e.g. for short tests)."""
    return os.environ.get("FOD_COMPILE", "1") not in ("0", "false", "no") and not _compile_failed


def _kernel(name: str, eager: Callable) -> Callable:
    if not compile_enabled():
        return eager
    with _compile_lock:
        if name not in _compiled:
            _compiled[name] = torch.compile(eager, dynamic=False, fullgraph=True)
        return _compiled[name]


def _run(name: str, eager: Callable, *tensors: torch.Tensor, **constants):
    """Run a kernel on row-flattened tensors: one compiled loop per key count, any batch.

    Leading dims (batch, heads, queries) are flattened into one dynamic row dim so that
    batch-size changes (last batch, evaluation) do not recompile.
    """
    global _compile_failed
    lead = tensors[0].shape[:-1]
    rows = [t.reshape(-1, t.shape[-1]) for t in tensors[:3]]
    rows += [t.reshape(-1) for t in tensors[3:]]
    kernel = _kernel(name, eager)
    if kernel is not eager:
        for t in rows:
            if t.shape[0] > 1:
                torch._dynamo.mark_dynamic(t, 0)
        try:
            outputs = kernel(*rows, **constants)
        except Exception as err:  # a broken toolchain must not stop training
            _compile_failed = True
            log.warning("torch.compile failed (%s); using eager kernels, which are slower", err)
            outputs = eager(*rows, **constants)
    else:
        outputs = eager(*rows, **constants)
    return tuple(o.reshape(*lead, *o.shape[1:]) for o in outputs)


class _DivergenceEntropy(torch.autograd.Function):
    """Returns (D(T, sg S), D(sg T, S), E(S)): equal D values, split gradients."""

    @staticmethod
    def forward(ctx, ty, tx, corr, eps: float):
        ty, tx, corr = ty.float(), tx.float(), corr.float()
        divergence, entropy = _run("forward", divergence_entropy_forward, ty, tx, corr, eps=eps)
        ctx.save_for_backward(ty, tx, corr)
        ctx.eps = eps
        return divergence, divergence.clone(), entropy

    @staticmethod
    def backward(ctx, grad_div_target, grad_div_corr, grad_entropy):
        ty, tx, corr = ctx.saved_tensors
        zeros = torch.zeros(corr.shape[:-1], device=corr.device, dtype=corr.dtype)
        grads = [
            g if g is not None else zeros for g in (grad_div_target, grad_div_corr, grad_entropy)
        ]
        grad_ty, grad_tx, grad_corr = _run(
            "backward", divergence_entropy_backward, ty, tx, corr, *grads, eps=ctx.eps
        )
        return grad_ty, grad_tx, grad_corr, None


def split_divergence_entropy(
    ty: torch.Tensor, tx: torch.Tensor, corr: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per query row: D(T, sg S) (phase 1), D(sg T, S) (phase 2) and E(S)."""
    return _DivergenceEntropy.apply(ty, tx, corr, eps)


@torch.no_grad()
def divergence(ty: torch.Tensor, tx: torch.Tensor, corr: torch.Tensor, eps: float) -> torch.Tensor:
    """D per query row, no gradient (scoring): about half the cost of the training kernel."""
    return _run("divergence", divergence_forward, ty.float(), tx.float(), corr.float(), eps=eps)[0]
