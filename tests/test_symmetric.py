"""The symmetric optimizer stack's rules: each update transforms as its block's symmetry group says.

For a rule ``U`` and a group element acting on the parameter (``W -> A W B^T``, an expert permutation, a
shared shift of the router rows), the gradient transforms the same way, and the update must follow:
``U(A G B^T) = A U(G) B^T``. Newton-Schulz is an odd matrix polynomial of the Frobenius-normalised input,
so the spectral rules are equivariant up to float error; fp32 matmuls (``highest``) keep that ~1e-5.
"""

import pytest
import torch

from moe_erc import symmetric
from moe_erc.symmetric import apply_rule

torch.manual_seed(0)


@pytest.fixture(autouse=True)
def fp32_newton_schulz():
    from emerging_optimizers import utils

    with utils.fp32_matmul_precision("highest"):
        yield


def orthogonal(n: int, seed: int) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed)))
    return q * torch.sign(torch.diagonal(r))


def permutation(n: int, seed: int) -> torch.Tensor:
    return torch.eye(n)[torch.randperm(n, generator=torch.Generator().manual_seed(seed))]


def grad(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def close(a, b, tol=2e-5):
    assert (a - b).abs().max().item() < tol * max(1.0, b.abs().max().item()), (a - b).abs().max().item()


def test_spectral_commutes_with_rotations_on_both_sides():
    g, a, b = grad(12, 8), orthogonal(12, 2), orthogonal(8, 3)
    close(apply_rule("spectral", a @ g @ b.T), a @ apply_rule("spectral", g) @ b.T)


@pytest.mark.parametrize("rule", ["row_norm", "hybrid"])
def test_embedding_rules_commute_with_token_permutations_and_hidden_rotations(rule):
    g, p, b = grad(16, 8), permutation(16, 4), orthogonal(8, 5)
    g[3] = 0.0  # a token absent from the batch
    u = apply_rule(rule, g)
    close(apply_rule(rule, p @ g @ b.T), p @ u @ b.T)
    if rule == "row_norm":
        norms = u.norm(dim=1)
        assert norms[3] == 0.0  # an absent token does not move
        close(norms[torch.arange(16) != 3], torch.full((15,), 8 ** 0.5))


def test_row_norm_does_not_commute_with_a_general_left_rotation():
    """Row-norm respects token permutations only: a generic rotation of the vocabulary changes it."""
    g, a = grad(16, 8), orthogonal(16, 6)
    assert (apply_rule("row_norm", a @ g) - a @ apply_rule("row_norm", g)).abs().max() > 1e-2


def test_row_aware_treats_gate_and_up_rows_of_a_neuron_as_one():
    D, d = 6, 8
    g, b, perm = grad(2 * D, d), orthogonal(d, 7), torch.randperm(D, generator=torch.Generator().manual_seed(8))
    joint = torch.cat([perm, perm + D])  # one permutation of neurons, applied to gate and up alike
    u = apply_rule("row_aware", g, glu_halves=True)
    close(apply_rule("row_aware", g[joint] @ b.T, glu_halves=True), u[joint] @ b.T)
    # The pre-normalisation scales gate_j and up_j by one number: their joint norm.
    n = symmetric.row_normalize(g, pair_halves=True)
    close(n[:D].square().sum(1) + n[D:].square().sum(1), torch.ones(D))


def test_col_aware_commutes_with_neuron_permutations_of_the_down_projection():
    g, a, p = grad(8, 6), orthogonal(8, 9), permutation(6, 10)
    close(apply_rule("col_aware", a @ g @ p.T), a @ apply_rule("col_aware", g) @ p.T)


@pytest.mark.parametrize("rule", ["centered_row_norm", "left_spectral"])
def test_router_rules_ignore_a_shared_shift_and_commute_with_expert_permutations(rule):
    g, p, b = grad(8, 16), permutation(8, 11), orthogonal(16, 12)
    u = apply_rule(rule, g)
    shift = grad(1, 16, seed=13)
    close(apply_rule(rule, g + shift), u)                     # adding v to every row: same update
    close(u.sum(0), torch.zeros(16))                          # and the update never moves the mean row
    close(apply_rule(rule, p @ g @ b.T), p @ u @ b.T)


def test_stacked_experts_get_their_own_update_each():
    g = grad(4, 12, 8)
    stacked = apply_rule("row_aware", g, glu_halves=True)
    for e in range(4):
        close(stacked[e], apply_rule("row_aware", g[e], glu_halves=True))
    order = torch.tensor([2, 0, 3, 1])
    close(apply_rule("col_aware", g[order]), apply_rule("col_aware", g)[order])


def test_scales_give_unit_rms_updates_times_the_extra_factor():
    g = grad(16, 64)
    for rule in ("spectral", "row_norm", "hybrid", "centered_row_norm"):
        u = apply_rule(rule, g, extra_scale=0.2)
        assert u.square().mean().sqrt().item() == pytest.approx(0.2, rel=0.1), rule


@pytest.mark.parametrize("name, shape, muon, sym", [
    ("embedding.word_embeddings.weight", (64, 8), "adamw", "row_norm"),
    ("output_layer.weight", (64, 8), "adamw", "row_norm"),
    ("decoder.layers.0.self_attention.linear_qkv.weight", (24, 8), "spectral", "spectral"),
    ("decoder.layers.0.self_attention.linear_proj.weight", (8, 8), "spectral", "spectral"),
    ("decoder.layers.0.mlp.linear_fc1.weight", (32, 8), "spectral", "row_aware"),
    ("decoder.layers.0.mlp.linear_fc2.weight", (8, 16), "spectral", "col_aware"),
    ("decoder.layers.1.mlp.router.weight", (4, 8), "spectral", "centered_row_norm"),
    ("decoder.layers.1.mlp.experts.local_experts.3.linear_fc1.weight", (32, 8), "spectral", "row_aware"),
    ("decoder.layers.1.mlp.experts.local_experts.3.linear_fc2.weight", (8, 16), "spectral", "col_aware"),
    ("decoder.layers.1.mlp.experts.weight1", (4, 32, 8), "spectral", "row_aware"),
    ("decoder.layers.1.mlp.experts.weight2", (4, 8, 16), "spectral", "col_aware"),
    ("decoder.layers.1.mlp.shared_experts.linear_fc1.weight", (32, 8), "spectral", "row_aware"),
    ("decoder.layers.0.input_layernorm.weight", (8,), "adamw", "adamw"),
    ("decoder.final_layernorm.weight", (8,), "adamw", "adamw"),
])
def test_each_parameter_class_gets_its_rule(name, shape, muon, sym):
    param = torch.nn.Parameter(torch.empty(shape))
    assert symmetric.rule_for(name, param, "muon") == muon
    assert symmetric.rule_for(name, param, "symmetric") == sym


def test_a_sigmoid_router_is_not_centered():
    """Sigmoid scores change under a shared shift, so the shift is no symmetry there."""
    param = torch.nn.Parameter(torch.empty(4, 8))
    assert symmetric.rule_for("decoder.layers.0.mlp.router.weight", param, "symmetric",
                              router_shift_invariant=False) == "row_norm"


def test_one_optimizer_step_matches_a_hand_computed_update():
    """SymmetricMuon = megatron's Muon momentum (Nesterov) + decoupled weight decay + the rule."""
    w0, g1, g2 = grad(8, 16, seed=20), grad(8, 16, seed=21), grad(8, 16, seed=22)
    param = torch.nn.Parameter(w0.clone())
    param.symmetry_rule = "centered_row_norm"
    lr, wd, beta = 0.05, 0.1, 0.9
    opt = symmetric.SymmetricMuon([param], lr=lr, momentum=beta, nesterov=True, weight_decay=wd,
                                  fp32_matmul_prec="highest", extra_scale_factor=0.2)
    w, m = w0.clone(), torch.zeros_like(w0)
    for g in (g1, g2):
        param.grad = g.clone()
        opt.step()
        w = w * (1 - lr * wd)
        m = beta * m + (1 - beta) * g
        nesterov = (1 - beta) * g + beta * m
        c = nesterov - nesterov.mean(0)
        u = c / c.norm(dim=1, keepdim=True) * 16 ** 0.5
        w = w - lr * 0.2 * (u - u.mean(0))
    close(param.detach(), w, tol=1e-6)


def test_newton_schulz_cost():
    assert symmetric.newton_schulz_flops(256, 64, 5) == 5 * (4 * 64 * 64 * 256 + 2 * 64 ** 3)


@pytest.fixture(scope="module")
def layouts():
    from launch import run_worker

    return run_worker("symmetric_layouts.py", nproc=2)


@pytest.mark.parametrize("layout", ["dp2", "ep2", "tp2"])
def test_two_process_layouts_give_the_single_process_update(layouts, layout):
    """Two optimizer steps on shards (TP=2 gathers for polar; EP=2 splits experts; DP=2 replicates)
    equal two steps on the whole blocks, for every rule."""
    rows = [r for r in layouts if r["layout"] == layout]
    assert len(rows) == 2
    for row in rows:
        assert set(row["errors"]) >= {"fc1", "fc2", "embedding", "router", "experts_fc1", "experts_fc2"}
        for name, (err, moved) in row["errors"].items():
            assert moved > 1e-3, name  # the step really moved the weights
            assert err < 1e-5 * max(1.0, moved), (layout, name, err, moved)
