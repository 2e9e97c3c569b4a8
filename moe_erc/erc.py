"""The expert-router coupling (ERC) loss as pure functions (SPEC §1; Lv et al., ICLR 2026).

Notation: ``n`` experts, hidden size ``d``, gate width ``D``; router ``R`` is ``[n, d]`` (row i is
expert i's router embedding), expert j's gate projection ``Wg_j`` is ``[D, d]`` (torch Linear layout).

1. ``eps_i = ||R_i - R_k|| / (2 ||R_i||)`` with ``k`` the nearest other row          :func:`noise_bounds`
2. ``P_i = R_i * delta_i``,  ``delta_i ~ U(1 - eps_i, 1 + eps_i)^d``                   :func:`proxy_tokens`
3. ``M[i, j] = ||Wg_j P_i||_2``                                                        :func:`activation_matrix`
4. ``L = 1/n^2 sum_i sum_{j != i} relu(M[i,j] - a M[i,i]) + relu(M[j,i] - a M[i,i])``  :func:`erc_loss_from_matrix`

``M`` needs ``2 n^2 d D`` FLOPs. A naive einsum keeps the ``[n, n, D]`` gate activations alive for
backward (128 MiB at n=256, D=512); :func:`gate_squared_norms` keeps only ``[n, m]`` and recomputes the
activations chunk by chunk in backward. Distributed evaluation lives in :mod:`moe_erc.erc_layer`.
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


def _as_chunks(gate_weight: GateWeights, n_rows: int) -> list[tuple[int, int, torch.Tensor]]:
    """Split gate weights into ``(first_expert, num_experts, [c*D, d] matrix)`` chunks of bounded size.

    A stacked ``[m, D, d]`` tensor is cut into views (no copy); a list gives one chunk per expert.
    """
    if isinstance(gate_weight, torch.Tensor):
        if gate_weight.dim() != 3:
            raise ValueError(f"gate_weight must be [m, D, d], got shape {tuple(gate_weight.shape)}")
        m, width, d = gate_weight.shape
        per_chunk = max(1, CHUNK_ELEMENTS // max(n_rows * width, 1))
        return [(a, min(per_chunk, m - a), gate_weight[a:a + per_chunk].reshape(-1, d))
                for a in range(0, m, per_chunk)]
    return [(j, 1, w) for j, w in enumerate(gate_weight)]


class _GateSquaredNorms(torch.autograd.Function):
    """``S[i, j] = ||W_j p_i||^2`` keeping only ``[n, m]`` for backward (gate activations recomputed)."""

    @staticmethod
    def forward(ctx, proxies, stacked, *weights):
        gate = stacked if stacked is not None else list(weights)
        chunks = _as_chunks(gate, proxies.shape[0])
        m = sum(c for _, c, _ in chunks)
        n = proxies.shape[0]
        out = proxies.new_empty(n, m, dtype=torch.float32)
        p = proxies.float()
        for first, count, w in chunks:
            h = p @ w.float().t()  # [n, c*D]
            out[:, first:first + count] = h.view(n, count, -1).pow(2).sum(-1)
        ctx.save_for_backward(proxies, stacked if stacked is not None else None, *weights)
        ctx.has_stacked = stacked is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        proxies, stacked, *weights = ctx.saved_tensors
        gate = stacked if ctx.has_stacked else weights
        n = proxies.shape[0]
        p = proxies.float()
        need_p, need_w = ctx.needs_input_grad[0], any(ctx.needs_input_grad[1:])
        grad_p = torch.zeros_like(p) if need_p else None
        grad_stacked = torch.empty_like(stacked) if ctx.has_stacked and need_w else None
        grad_weights = [None] * len(weights)
        for first, count, w in _as_chunks(gate, n):
            wf = w.float()
            h = (p @ wf.t()).view(n, count, -1)
            g = (h * (2.0 * grad_out[:, first:first + count]).unsqueeze(-1)).view(n, -1)  # dL/dH, [n, c*D]
            if need_p:
                grad_p.addmm_(g, wf)
            if need_w:
                if ctx.has_stacked and grad_stacked.dtype == torch.float32:  # written in place: no chunk copy
                    torch.mm(g.t(), p, out=grad_stacked[first:first + count].view(-1, p.shape[1]))
                elif ctx.has_stacked:
                    grad_stacked[first:first + count] = (g.t() @ p).view(count, -1, p.shape[1])
                else:
                    grad_weights[first] = (g.t() @ p).to(w.dtype)  # [D, d]
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
