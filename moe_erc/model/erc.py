"""The expert-router coupling (ERC) loss as pure functions (SPEC §1; Lv et al., ICLR 2026).

Notation: ``n`` experts, hidden size ``d``, gate width ``D``; router ``R`` is ``[n, d]`` (row i is
expert i's router embedding), expert j's gate projection ``Wg_j`` is ``[D, d]`` (torch Linear layout).

1. ``eps_i = ||R_i - R_k|| / (2 ||R_i||)`` with ``k`` the nearest other row          :func:`noise_bounds`
2. ``P_i = R_i * delta_i``,  ``delta_i ~ U(1 - eps_i, 1 + eps_i)^d``                   :func:`proxy_tokens`
3. ``M[i, j] = ||Wg_j P_i||_2``                                                        :func:`activation_matrix`
4. ``L = 1/n^2 sum_i sum_{j != i} relu(M[i,j] - a M[i,i]) + relu(M[j,i] - a M[i,i])``  :func:`erc_loss_from_matrix`

``M`` needs ``2 n^2 d D`` FLOPs. A naive einsum keeps the ``[n, n, D]`` gate activations alive for
backward (128 MiB at n=256, D=512); :func:`gate_squared_norms` keeps only ``[n, m]`` and recomputes the
activations chunk by chunk in backward. Distributed evaluation lives in :mod:`moe_erc.model.layers.erc_layer`.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

GateWeights = Union[torch.Tensor, Sequence[torch.Tensor]]

# Gate activations materialised at once (elements), forward and backward: bounds the transient memory
# (16 Mi fp32 = 64 MiB) while keeping each GEMM large enough to run at full speed.
CHUNK_ELEMENTS = 1 << 24


@torch.no_grad()
def noise_bounds(router_weight: torch.Tensor) -> torch.Tensor:
    """``[n, d] -> [n]``: half the distance to the nearest other router row, relative to the row's norm.

    A row scaled coordinate-wise by factors in ``[1 - eps_i, 1 + eps_i]`` moves by at most
    ``eps_i ||R_i||`` = half the gap to its nearest neighbour, so it stays closer to its own row.
    """
    rows = router_weight.detach().float()
    n = rows.shape[0]
    if n < 2:
        raise ValueError(f"noise_bounds needs at least 2 router rows, got {n}")
    distances = torch.cdist(rows, rows, compute_mode="donot_use_mm_for_euclid_dist")
    distances.fill_diagonal_(float("inf"))
    nearest = distances.min(dim=1).values
    return nearest / (2 * rows.norm(dim=1).clamp_min(torch.finfo(torch.float32).tiny))


def proxy_tokens(router_weight: torch.Tensor, eps: torch.Tensor,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``[n, d], [n] -> [n, d]``: ``R * delta`` with ``delta ~ U(1 - eps_i, 1 + eps_i)`` per coordinate.

    ``delta`` carries no gradient; the product does (into ``router_weight``, unless it is detached).
    Pass the same seeded ``generator`` on every rank that holds a copy of ``R``.
    """
    uniform = torch.rand(router_weight.shape, generator=generator, dtype=torch.float32,
                         device=router_weight.device)
    delta = 1.0 + (2.0 * uniform - 1.0) * eps.detach().float().unsqueeze(1)
    return router_weight.float() * delta


def _chunks(gate_weight: GateWeights, n_rows: int) -> list[tuple[int, int, torch.Tensor]]:
    """Split gate weights into ``(first_expert, num_experts, [c, D, d] tensor)`` chunks of bounded size.

    A stacked ``[m, D, d]`` tensor (contiguous, or a strided view such as GroupedExperts' gate half) is cut
    into views; list entries are stacked one chunk at a time (a copy of one chunk, in the weights' dtype).
    """
    if isinstance(gate_weight, torch.Tensor):
        if gate_weight.dim() != 3:
            raise ValueError(f"gate_weight must be [m, D, d], got shape {tuple(gate_weight.shape)}")
        m, width, _ = gate_weight.shape
    else:
        m, width = len(gate_weight), gate_weight[0].shape[0]
    per_chunk = max(1, CHUNK_ELEMENTS // max(n_rows * width, 1))
    chunks = []
    for first in range(0, m, per_chunk):
        count = min(per_chunk, m - first)
        part = gate_weight[first:first + count]
        chunks.append((first, count, part if isinstance(part, torch.Tensor) else torch.stack(list(part))))
    return chunks


def _gate_activations(proxies: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``[n, d]`` proxies (in the weights' dtype), ``[c, D, d]`` weights -> ``[n, c, D]`` gate activations.

    GEMMs in the weights' dtype (bf16 on GPU: tensor cores, fp32 accumulation), never an fp32 weight copy.
    Contiguous weights: one GEMM ``[n, d] x [d, c*D]`` (the floor). Strided views (GroupedExperts' gate
    half of ``[m, 2D, d]``): a batched GEMM that reads the view in place (cuBLAS; the CPU copies the chunk).
    """
    c, width, d = weights.shape
    if weights.is_contiguous():
        return (proxies @ weights.view(c * width, d).t()).view(-1, c, width)
    return torch.bmm(proxies.expand(c, *proxies.shape), weights.transpose(1, 2)).transpose(0, 1)


def _gate_backward(g: torch.Tensor, proxies: torch.Tensor, weights: torch.Tensor, grad_out=None):
    """``dL/dH`` ``[n, c, D]`` -> (``dL/dP`` ``[n, d]`` in the GEMM dtype, ``dL/dW`` ``[c, D, d]`` written into
    ``grad_out`` when given)."""
    c, width, d = weights.shape
    if weights.is_contiguous():
        flat_g, flat_w = g.view(-1, c * width), weights.view(c * width, d)
        grad_p = flat_g @ flat_w
        if grad_out is not None and grad_out.is_contiguous():
            torch.mm(flat_g.t(), proxies, out=grad_out.view(c * width, d))
        elif grad_out is not None:
            grad_out.copy_((flat_g.t() @ proxies).view(c, width, d))
        return grad_p
    per_expert = g.transpose(0, 1)  # [c, n, D]
    grad_p = torch.bmm(per_expert, weights).sum(0)
    if grad_out is not None:
        grad_out.copy_(torch.bmm(per_expert.transpose(1, 2), proxies.expand(c, *proxies.shape)))
    return grad_p


class _GateSquaredNorms(torch.autograd.Function):
    """``S[i, j] = ||W_j p_i||^2`` keeping only ``[n, m]`` for backward (gate activations recomputed).

    GEMMs run in the weights' dtype; squared norms, their gradients and the proxies' gradient in fp32.
    """

    @staticmethod
    def forward(ctx, proxies, stacked, *weights):
        gate = stacked if stacked is not None else list(weights)
        n = proxies.shape[0]
        p = proxies.to(gate[0].dtype)
        chunks = _chunks(gate, n)
        acc = torch.promote_types(p.dtype, torch.float32)  # fp32 (fp64 stays fp64)
        out = proxies.new_empty(n, sum(c for _, c, _ in chunks), dtype=acc)
        for first, count, w in chunks:
            h = _gate_activations(p, w)  # [n, c, D]
            out[:, first:first + count] = torch.linalg.vector_norm(h, dim=-1, dtype=acc).square()
        ctx.save_for_backward(proxies, stacked if stacked is not None else None, *weights)
        ctx.has_stacked = stacked is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        proxies, stacked, *weights = ctx.saved_tensors
        gate = stacked if ctx.has_stacked else weights
        n = proxies.shape[0]
        p = proxies.to(gate[0].dtype)
        need_p, need_w = ctx.needs_input_grad[0], any(ctx.needs_input_grad[1:])
        acc = torch.promote_types(p.dtype, torch.float32)
        grad_p = torch.zeros(proxies.shape, dtype=acc, device=proxies.device) if need_p else None
        grad_stacked = torch.empty_like(stacked) if ctx.has_stacked and need_w else None
        grad_weights = [None] * len(weights)
        for first, count, w in _chunks(gate, n):
            h = _gate_activations(p, w)  # [n, c, D], recomputed
            scale = 2.0 * grad_out[:, first:first + count].unsqueeze(-1).to(acc)  # [n, c, 1]
            g = (h.to(acc) * scale).to(w.dtype)  # dL/dH, contiguous [n, c, D]
            if ctx.has_stacked:
                target = grad_stacked[first:first + count] if need_w else None
            else:
                target = torch.empty_like(w) if need_w else None
            partial_p = _gate_backward(g, p, w, target)
            if need_p:
                grad_p += partial_p
            if need_w and not ctx.has_stacked:
                grad_weights[first:first + count] = list(target.unbind(0))
        if grad_p is not None:
            grad_p = grad_p.to(proxies.dtype)
        return (grad_p, grad_stacked, *grad_weights)


def gate_squared_norms(proxies: torch.Tensor, gate_weight: GateWeights) -> torch.Tensor:
    """``[n, d]`` proxies and ``m`` gate weights (``[m, D, d]`` or a list of ``[D, d]``) -> ``[n, m]``
    squared norms ``||W_j p_i||^2``, in fp32. Under tensor parallelism each rank passes its ``D`` shard and
    the partial results are summed before the square root."""
    if isinstance(gate_weight, torch.Tensor):
        return _GateSquaredNorms.apply(proxies, gate_weight)
    return _GateSquaredNorms.apply(proxies, None, *gate_weight)


def norms_from_squares(squared: torch.Tensor) -> torch.Tensor:
    """``sqrt`` that stays differentiable at 0 (an unused expert) and keeps only its result for backward."""
    return (squared + 1e-30).sqrt()


def activation_matrix(proxies: torch.Tensor, gate_weight: GateWeights) -> torch.Tensor:
    """``[n, d]``, ``[m, D, d]`` -> ``M`` ``[n, m]`` with ``M[i, j] = ||gate_weight[j] @ proxies[i]||_2``."""
    return norms_from_squares(gate_squared_norms(proxies, gate_weight))


def _violations(M: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``[n, n]`` hinge arguments of both constraints, diagonal masked to 0 (each ``[i, j]`` pairs with i's
    own entry): ``M[i, j] - alpha M[i, i]`` (specialisation) and ``M[j, i] - alpha M[i, i]`` (precision)."""
    n = M.shape[0]
    own = alpha * M.diagonal().unsqueeze(1)
    off = ~torch.eye(n, dtype=torch.bool, device=M.device)
    return (M - own).masked_fill(~off, 0.0), (M.t() - own).masked_fill(~off, 0.0)


class _ERCHinge(torch.autograd.Function):
    """The hinge loss keeping only ``M`` for backward (masks are recomputed: O(n^2) either way, but one
    ``[n, n]`` tensor instead of five)."""

    @staticmethod
    def forward(ctx, M, alpha):
        ctx.alpha = alpha
        ctx.save_for_backward(M)
        specialisation, precision = _violations(M, alpha)
        return (specialisation.clamp_min(0).sum() + precision.clamp_min(0).sum()) / M.shape[0] ** 2

    @staticmethod
    def backward(ctx, grad):
        (M,) = ctx.saved_tensors
        n, alpha = M.shape[0], ctx.alpha
        specialisation, precision = _violations(M, alpha)
        active_s = (specialisation > 0).to(M.dtype)  # d/dM[i, j] and -alpha d/dM[i, i]
        active_p = (precision > 0).to(M.dtype)       # d/dM[j, i] and -alpha d/dM[i, i]
        grad_m = active_s + active_p.t()
        grad_m.diagonal().sub_(alpha * (active_s.sum(1) + active_p.sum(1)))
        return (grad_m * (grad / n**2)).to(M.dtype), None


def erc_loss_from_matrix(M: torch.Tensor, alpha: float) -> torch.Tensor:
    """``[n, n] -> scalar``: hinge penalties of both ERC constraints, mean over all ``n^2`` entries.

    Row i (proxy i) must activate its own expert more than any other (``M[i, j] <= alpha M[i, i]``), and
    expert i must respond to its own proxy more than to any other (``M[j, i] <= alpha M[i, i]``).
    """
    n = M.shape[0]
    if M.shape != (n, n):
        raise ValueError(f"M must be square [n, n], got {tuple(M.shape)}")
    return _ERCHinge.apply(M, float(alpha))


@torch.no_grad()
def diagonal_margin(M: torch.Tensor) -> torch.Tensor:
    """``min_i (M[i, i] - max_{j != i} max(M[i, j], M[j, i]))``: > 0 when every expert wins its own proxy
    in both directions (the ERC constraints hold at alpha = 1)."""
    n = M.shape[0]
    off = torch.eye(n, dtype=torch.bool, device=M.device)
    rival = torch.maximum(M, M.t()).masked_fill(off, float("-inf")).max(dim=1).values
    return (M.diagonal() - rival).min()


def erc_loss(router_weight: torch.Tensor, gate_weight: GateWeights, alpha: float = 1.0,
             generator: Optional[torch.Generator] = None, noise: bool = True,
             grad_to_router: bool = True) -> torch.Tensor:
    """Single-process ERC loss of one layer: noise bounds -> proxies -> M -> hinge loss."""
    router = router_weight if grad_to_router else router_weight.detach()
    if noise:
        proxies = proxy_tokens(router, noise_bounds(router_weight), generator)
    else:
        proxies = router.float()
    return erc_loss_from_matrix(activation_matrix(proxies, gate_weight), alpha)
