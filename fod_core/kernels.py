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


def _compile_in_process() -> None:
    """Inductor compiles in a pool of worker processes by default (one per core), each a
    whole Python with PyTorch loaded: about 2 GB beside a 3 GB training on the 2-core CPU
    (BENCHMARKS.md), which a pod's memory limit counts too. FOD compiles a handful of small
    kernels, so it compiles them in this process (FOD_COMPILE_THREADS overrides)."""
    import torch._inductor.config as inductor

    inductor.compile_threads = int(os.environ.get("FOD_COMPILE_THREADS", "1"))


def _kernel(name: str, eager: Callable) -> Callable:
    # torch.export (``fod export``) traces the eager code: the graph is compiled elsewhere.
    if not compile_enabled() or torch.compiler.is_exporting():
        return eager
    with _compile_lock:
        if name not in _compiled:
            _compile_in_process()
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


# -- attention and its divergence terms, in blocks of query rows (training) -----------
ROW_BLOCK_BYTES = 64 * 2**20  # one block's correlation map, fp32: bounds every temporary


def rows_per_block(batch: int, heads: int, keys: int) -> int:
    """Query rows per block, so that one block's (batch, heads, rows, keys) fp32 map stays
    within ``ROW_BLOCK_BYTES``."""
    return max(1, ROW_BLOCK_BYTES // (batch * heads * keys * 4))


def _sum_to(tensor: torch.Tensor, batch: int) -> torch.Tensor:
    """A gradient of a batch-broadcast input (the class reference's keys, batch 1)."""
    return tensor.sum(0, keepdim=True) if batch == 1 and tensor.shape[0] != 1 else tensor


class _AttentionDivergence(torch.autograd.Function):
    """softmax(Q K^T) V with D(T, sg S), D(sg T, S) and E(S) per query row, where S is
    never kept whole: the forward pass runs in blocks of query rows and keeps Q, K, V and
    the target's factors; the backward pass recomputes each block's S."""

    @staticmethod
    def forward(ctx, q, k, v, ty, tx, eps: float, rows: int):
        n, heads, length, _ = q.shape
        out = q.new_empty(n, heads, length, v.shape[-1])
        div = q.new_empty(n, heads, length, dtype=torch.float32)
        ent = torch.empty_like(div)
        for start in range(0, length, rows):
            block = slice(start, start + rows)
            corr = torch.softmax((q[:, :, block] @ k.transpose(-2, -1)).float(), dim=-1)
            out[:, :, block] = corr.to(v.dtype) @ v
            div[:, :, block], ent[:, :, block] = _run(
                "lean_forward", divergence_entropy_forward, ty[:, :, block].float(),
                tx[:, :, block].float(), corr, eps=eps,
            )  # fmt: skip
        ctx.save_for_backward(q, k, v, ty, tx)
        ctx.eps, ctx.rows = eps, rows
        return out, div, div.clone(), ent

    @staticmethod
    def backward(ctx, grad_out, grad_div_target, grad_div_corr, grad_entropy):
        q, k, v, ty, tx = (t.detach() for t in ctx.saved_tensors)  # one compiled variant
        n, heads, length, _ = q.shape
        zeros = q.new_zeros(n, heads, length, dtype=torch.float32)
        grad_out = (
            grad_out
            if grad_out is not None
            else torch.zeros_like(q[..., :1]).expand(n, heads, length, v.shape[-1])
        )
        grads = [g if g is not None else zeros for g in (grad_div_target, grad_div_corr,
                                                         grad_entropy)]  # fmt: skip
        grad_q = torch.empty_like(q)
        grad_k = q.new_zeros(n, heads, *k.shape[2:])
        grad_v = q.new_zeros(n, heads, *v.shape[2:])
        grad_ty, grad_tx = (
            torch.empty_like(ty, dtype=torch.float32),
            torch.empty_like(tx, dtype=torch.float32),
        )
        for start in range(0, length, ctx.rows):
            block = slice(start, start + ctx.rows)
            q_block, grad_out_block = q[:, :, block], grad_out[:, :, block]
            corr = torch.softmax((q_block @ k.transpose(-2, -1)).float(), dim=-1)
            grad_ty[:, :, block], grad_tx[:, :, block], grad_corr = _run(
                "lean_backward", divergence_entropy_backward, ty[:, :, block].float(),
                tx[:, :, block].float(), corr, *(g[:, :, block] for g in grads), eps=ctx.eps,
            )  # fmt: skip
            grad_corr = grad_corr + (grad_out_block @ v.transpose(-2, -1)).float()
            grad_logits = corr * (grad_corr - (grad_corr * corr).sum(-1, keepdim=True))
            grad_logits = grad_logits.to(q.dtype)
            grad_q[:, :, block] = grad_logits @ k
            grad_k += grad_logits.transpose(-2, -1) @ q_block
            grad_v += corr.to(v.dtype).transpose(-2, -1) @ grad_out_block
        return (
            grad_q, _sum_to(grad_k, k.shape[0]), _sum_to(grad_v, v.shape[0]),
            grad_ty.to(ty.dtype), grad_tx.to(tx.dtype), None, None,
        )  # fmt: skip


def attention_divergence(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ty: torch.Tensor,
    tx: torch.Tensor,
    eps: float,
    rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(softmax(Q K^T) V, D(T, sg S), D(sg T, S), E(S)) with S kept one block of query rows
    at a time, in the forward and the backward pass: training memory no longer grows with
    batch x heads x L x L. Q is already scaled; K and V may have batch 1 (broadcast)."""
    if rows is None:
        rows = rows_per_block(q.shape[0], q.shape[1], k.shape[-2])
    return _AttentionDivergence.apply(q, k, v, ty, tx, eps, rows)
