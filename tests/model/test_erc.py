"""ERC pure functions against slow float64 loops written straight from SPEC §1."""

import itertools

import pytest
import torch

from moe_erc.model import erc


def loop_noise_bounds(R):
    n = R.shape[0]
    out = []
    for i in range(n):
        nearest = min(float((R[i] - R[k]).norm()) for k in range(n) if k != i)
        out.append(nearest / (2 * float(R[i].norm())))
    return torch.tensor(out, dtype=torch.float64)


def loop_activation_matrix(P, W):
    n, m = P.shape[0], W.shape[0]
    return torch.tensor([[float((W[j] @ P[i]).norm()) for j in range(m)] for i in range(n)], dtype=torch.float64)


def loop_erc_loss(M, alpha):
    n = M.shape[0]
    total = 0.0
    for i, j in itertools.product(range(n), range(n)):
        if i != j:
            total += max(0.0, float(M[i, j] - alpha * M[i, i])) + max(0.0, float(M[j, i] - alpha * M[i, i]))
    return total / n**2


@pytest.mark.parametrize("n, d, D, alpha", [(2, 3, 4, 1.0), (5, 8, 6, 0.5), (8, 16, 12, 1.0), (16, 24, 7, 2.0)])
def test_functions_match_float64_loops(n, d, D, alpha):
    g = torch.Generator().manual_seed(n * 1000 + d)
    R = torch.randn(n, d, generator=g, dtype=torch.float64)
    W = torch.randn(n, D, d, generator=g, dtype=torch.float64)
    assert torch.allclose(erc.noise_bounds(R).double(), loop_noise_bounds(R), rtol=1e-5)
    P = R.float()
    M = erc.activation_matrix(P, W.float())
    M_ref = loop_activation_matrix(P.double(), W)
    assert torch.allclose(M.double(), M_ref, rtol=1e-5)
    assert erc.erc_loss_from_matrix(M_ref, alpha).item() == pytest.approx(loop_erc_loss(M_ref, alpha), rel=1e-12)
    assert erc.erc_loss_from_matrix(M, alpha).item() == pytest.approx(loop_erc_loss(M_ref, alpha), rel=1e-5)


def test_list_of_expert_weights_equals_stacked_tensor():
    g = torch.Generator().manual_seed(1)
    P = torch.randn(6, 10, generator=g)
    W = torch.randn(6, 5, 10, generator=g)
    assert torch.allclose(erc.activation_matrix(P, W), erc.activation_matrix(P, list(W)))


def test_chunked_evaluation_equals_one_chunk(monkeypatch):
    g = torch.Generator().manual_seed(2)
    P = torch.randn(8, 12, generator=g, requires_grad=True)
    W = torch.randn(8, 6, 12, generator=g, requires_grad=True)
    erc.activation_matrix(P, W).sum().backward()
    whole = P.grad.clone(), W.grad.clone()
    P.grad = W.grad = None
    monkeypatch.setattr(erc, "CHUNK_ELEMENTS", 8 * 6)  # one expert per chunk
    erc.activation_matrix(P, W).sum().backward()
    assert torch.allclose(P.grad, whole[0], atol=1e-5) and torch.allclose(W.grad, whole[1], atol=1e-5)


def test_gradients_match_the_naive_einsum():
    g = torch.Generator().manual_seed(3)
    R = torch.randn(7, 9, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(7, 5, 9, generator=g, dtype=torch.float64, requires_grad=True)
    for alpha in (0.5, 1.0):
        ours = torch.autograd.grad(erc.erc_loss_from_matrix(erc.activation_matrix(R, W), alpha), (R, W))
        naive_M = torch.einsum("nd,mDd->nmD", R, W).norm(dim=-1)
        naive = torch.autograd.grad(erc.erc_loss_from_matrix(naive_M, alpha), (R, W))
        assert torch.allclose(ours[0].double(), naive[0], rtol=1e-5, atol=1e-7)
        assert torch.allclose(ours[1].double(), naive[1], rtol=1e-5, atol=1e-7)


def test_diagonal_dominance_gives_zero_loss_and_positive_margin():
    M = torch.tensor([[5.0, 1.0, 2.0], [0.5, 4.0, 1.0], [1.0, 0.2, 3.0]])
    assert erc.erc_loss_from_matrix(M, 1.0).item() == 0.0
    assert erc.diagonal_margin(M).item() == pytest.approx(min(5 - 2, 4 - 1, 3 - 2))


def test_worked_example():
    # n=2: M = [[1, 3], [2, 4]], alpha=1.
    # i=0, j=1: relu(M01 - M00) + relu(M10 - M00) = relu(3-1) + relu(2-1) = 3
    # i=1, j=0: relu(M10 - M11) + relu(M01 - M11) = relu(2-4) + relu(3-4) = 0      -> L = 3 / 4
    M = torch.tensor([[1.0, 3.0], [2.0, 4.0]])
    assert erc.erc_loss_from_matrix(M, 1.0).item() == pytest.approx(0.75)
    # alpha = 0.5: i=0: relu(3-.5) + relu(2-.5) = 4; i=1: relu(2-2) + relu(3-2) = 1  -> 5/4
    assert erc.erc_loss_from_matrix(M, 0.5).item() == pytest.approx(1.25)
    assert erc.diagonal_margin(M).item() == pytest.approx(1 - 3)


def test_every_proxy_stays_closer_to_its_own_router_row():
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        R = torch.randn(32, 16, generator=g)
        P = erc.proxy_tokens(R, erc.noise_bounds(R), generator=g)
        distances = torch.cdist(P, R)
        assert torch.equal(distances.argmin(dim=1), torch.arange(32))


def test_proxy_noise_is_within_the_bound_and_reproducible():
    R = torch.randn(10, 40)
    eps = erc.noise_bounds(R)
    P1 = erc.proxy_tokens(R, eps, torch.Generator().manual_seed(7))
    P2 = erc.proxy_tokens(R, eps, torch.Generator().manual_seed(7))
    assert torch.equal(P1, P2)
    ratio = P1 / R
    assert bool(((ratio - 1).abs() <= eps.unsqueeze(1) + 1e-6).all())
    assert bool(((ratio - 1).abs() > 0.5 * eps.unsqueeze(1)).any())  # noise is really drawn


def test_gradients_reach_router_and_gate_weights_and_can_spare_the_router():
    torch.manual_seed(0)
    R = torch.randn(6, 8, requires_grad=True)
    W = torch.randn(6, 5, 8, requires_grad=True)
    erc.erc_loss(R, W, alpha=0.5, generator=torch.Generator().manual_seed(0)).backward()
    assert R.grad is not None and R.grad.abs().sum() > 0 and W.grad.abs().sum() > 0
    R.grad = W.grad = None
    erc.erc_loss(R, W, alpha=0.5, generator=torch.Generator().manual_seed(0), grad_to_router=False).backward()
    assert R.grad is None and W.grad.abs().sum() > 0


def test_activation_memory_kept_for_backward_is_o_n_squared():
    """What autograd saves: the inputs (which exist anyway) and nothing of size n*m*D."""
    n, d, D = 64, 32, 48
    P = torch.randn(n, d, requires_grad=True)
    W = torch.randn(n, D, d, requires_grad=True)
    saved = []

    def keep(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        erc.erc_loss_from_matrix(erc.activation_matrix(P, W), 1.0)
    extra = {t.data_ptr(): t.numel() for t in saved if t.data_ptr() not in (P.data_ptr(), W.data_ptr())}
    assert sum(extra.values()) <= n * n  # M itself, nothing else
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        erc.erc_loss_from_matrix(torch.einsum("nd,mDd->nmD", P, W).norm(dim=-1), 1.0)
    assert max(t.numel() for t in saved) == n * n * D  # the naive path keeps the activations


def reference_hinge(M, alpha):
    """SPEC §1.4 written with autograd-visible ops only (the independent check of the custom backward)."""
    n = M.shape[0]
    off = 1.0 - torch.eye(n, dtype=M.dtype)
    own = alpha * M.diagonal().unsqueeze(1)
    return ((torch.relu(M - own) + torch.relu(M.t() - own)) * off).sum() / n**2


@pytest.mark.parametrize("alpha", [0.3, 1.0, 2.0])
def test_hinge_gradient_matches_autograd_reference_and_gradcheck(alpha):
    g = torch.Generator().manual_seed(int(alpha * 10))
    M = (torch.rand(9, 9, generator=g, dtype=torch.float64) + 0.1).requires_grad_()
    ours = torch.autograd.grad(erc.erc_loss_from_matrix(M, alpha), M)[0]
    reference = torch.autograd.grad(reference_hinge(M, alpha), M)[0]
    assert torch.allclose(ours, reference, atol=1e-12)
    assert torch.autograd.gradcheck(lambda m: erc.erc_loss_from_matrix(m, alpha), (M,))


def _cpu_allocated_bytes(fn) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max((e.cpu_memory_usage for e in prof.events()), default=0)


@pytest.mark.parametrize("layout", ["stacked", "strided-view", "list"])
def test_bf16_weights_match_float64_without_fp32_weight_copies(layout):
    """bf16 GEMMs (fp32 accumulation and norms) against float64 on the same bf16 values: M within 1e-2
    relative; no allocation as large as an fp32 copy of the gate weights (a list is stacked one bf16 chunk
    at a time; a strided view costs one bf16 chunk on CPU, where bmm copies it; cuBLAS reads it in place)."""
    g = torch.Generator().manual_seed(5)
    n, D, d = 32, 64, 96
    R = torch.randn(n, d, generator=g).bfloat16()
    W = torch.randn(n, 2 * D, d, generator=g).bfloat16()  # [gate; up] like GroupedExperts' weight1
    gate = {"stacked": W[:, :D].contiguous(), "strided-view": W[:, :D], "list": list(W[:, :D].contiguous())}[layout]
    M_ref = loop_activation_matrix(R.double(), W[:, :D].double())
    M = erc.activation_matrix(R.float(), gate)
    torch.testing.assert_close(M.double(), M_ref, rtol=1e-2, atol=0)
    fp32_copy = n * D * d * 4
    largest = _cpu_allocated_bytes(lambda: erc.activation_matrix(R.float(), gate))
    assert largest < (fp32_copy / 2 if layout == "stacked" else fp32_copy), (largest, fp32_copy)
