"""The ERC loss and its router / expert gradients on the device in bf16, against float64 on the CPU.

R ``[n, d]`` and stacked gate weights W ``[n, D, d]`` are drawn in bf16 and put on the device; the loss of
:func:`moe_erc.model.erc.erc_loss` (clean proxies, ``noise=False``, so no device RNG is involved) and its gradients
are compared with an independent einsum written from the formulas, run in float64 on the same bf16 values:

    M[i, j] = ||W_j R_i||,   L = 1/n^2 sum_{i != j} relu(M[i,j] - a M[i,i]) + relu(M[j,i] - a M[i,i])

alpha = 0.5 keeps every hinge term far inside its active region (checked), so rounding cannot flip the
active set. Tolerances: bf16 inputs, GEMMs accumulated in fp32 (or better), gradients stored in bf16
(2^-8 relative per entry): loss and M to rel 1e-2; gradients to a relative L2 error < 2e-2 and a cosine
similarity > 0.999. Under MOE_ERC_GPU_TIER_DEVICE=cpu the same checks run on the CPU.
"""

import pytest
import torch

from moe_erc.model.erc import activation_matrix, erc_loss, noise_bounds, proxy_tokens

ALPHA = 0.5
SHAPES = [(64, 128, 1536), (256, 512, 64)]  # (n, D, d): 3B-like d; 15B-like n and D. Reference < 1 s each.


def draw(n, D, d, device):
    g = torch.Generator().manual_seed(n + D + d)
    R = torch.randn(n, d, generator=g).to(device, torch.bfloat16)
    W = (torch.randn(n, D, d, generator=g) / d**0.5).to(device, torch.bfloat16)
    return R, W


def reference(R, W, alpha):
    """float64 on the CPU: (loss, M, dL/dR, dL/dW), straight from the formulas."""
    R = R.detach().cpu().double().requires_grad_()
    W = W.detach().cpu().double().requires_grad_()
    M = torch.einsum("jed,id->ije", W, R).norm(dim=-1)  # [n, n]: expert j's gate on row i
    n, own = M.shape[0], alpha * M.diagonal()[:, None]
    off = ~torch.eye(n, dtype=torch.bool)
    slack = torch.stack([(M - own)[off], (M.t() - own)[off]])
    assert slack.min() > 0.05 * M.mean(), "a hinge term is near its kink (rounding could flip it)"
    loss = torch.relu(slack).sum() / n**2
    loss.backward()
    return loss.detach(), M.detach(), R.grad, W.grad


def on_device(R, W, alpha):
    """(loss, dL/dR, dL/dW) of moe_erc.model.erc on R's device; W stacked, or a list of [D, d] leaves."""
    R = R.clone().requires_grad_()
    Ws = [w.clone().requires_grad_() for w in W] if isinstance(W, list) else W.clone().requires_grad_()
    loss = erc_loss(R, Ws, alpha=alpha, noise=False)
    loss.backward()
    grad_w = torch.stack([w.grad for w in Ws]) if isinstance(Ws, list) else Ws.grad
    return loss.detach(), R.grad, grad_w


def assert_close_grad(grad, expected, rel_l2, name):
    grad, expected = grad.detach().cpu().double().flatten(), expected.detach().cpu().double().flatten()
    error = (grad - expected).norm() / expected.norm()
    cosine = torch.nn.functional.cosine_similarity(grad, expected, dim=0)
    assert error < rel_l2 and cosine > 0.999, (name, float(error), float(cosine))


@pytest.mark.parametrize("n, D, d", SHAPES)
def test_erc_loss_and_gradients_match_float64(device, n, D, d):
    R, W = draw(n, D, d, device)
    loss_ref, M_ref, grad_r_ref, grad_w_ref = reference(R, W, ALPHA)
    loss, grad_r, grad_w = on_device(R, W, ALPHA)
    assert loss.device.type == grad_r.device.type == grad_w.device.type == device
    assert grad_r.dtype == grad_w.dtype == torch.bfloat16
    M = activation_matrix(R.float(), W).cpu().double()
    assert torch.allclose(M, M_ref, rtol=1e-2, atol=0), float(((M - M_ref) / M_ref).abs().max())
    assert float(loss) == pytest.approx(float(loss_ref), rel=1e-2)
    assert_close_grad(grad_r, grad_r_ref, 2e-2, "router")
    assert_close_grad(grad_w, grad_w_ref, 2e-2, "experts")


@pytest.mark.parametrize("n, D, d", SHAPES[:1])
def test_gate_weights_as_a_list_give_the_stacked_result(device, n, D, d):
    """The same products batched differently: equal up to fp32 accumulation order (loss rel 1e-3, gradients
    rel L2 5e-3, which leaves room for a few one-ulp differences in the bf16 gradients)."""
    R, W = draw(n, D, d, device)
    loss_s, grad_r_s, grad_w_s = on_device(R, W, ALPHA)
    loss_l, grad_r_l, grad_w_l = on_device(R, list(W), ALPHA)
    assert float(loss_l) == pytest.approx(float(loss_s), rel=1e-3)
    assert_close_grad(grad_r_l, grad_r_s, 5e-3, "router")
    assert_close_grad(grad_w_l, grad_w_s, 5e-3, "experts")


def test_noise_bounds_and_proxies_on_device(device):
    """eps_i = min_k ||R_i - R_k|| / (2 ||R_i||) to rel 1e-3 (fp32 distances of bf16 rows); every proxy
    stays within its bound coordinate-wise, hence nearer its own router row than any other."""
    R, _ = draw(64, 1, 1536, device)
    R64 = R.cpu().double()
    distances = torch.cdist(R64, R64).fill_diagonal_(float("inf"))
    eps_ref = distances.min(1).values / (2 * R64.norm(dim=1))
    eps = noise_bounds(R)
    assert eps.device.type == device
    assert torch.allclose(eps.cpu().double(), eps_ref, rtol=1e-3, atol=0)
    P = proxy_tokens(R, eps, torch.Generator(device=device).manual_seed(0))
    ratio = (P.double() / R.double()).cpu() - 1  # R has no zero entries (drawn from a normal)
    assert (ratio.abs() <= eps.cpu().double()[:, None] * (1 + 1e-5)).all()
    assert torch.equal(torch.cdist(P.cpu().double(), R64).argmin(1), torch.arange(64))
