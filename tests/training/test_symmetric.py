"""The symmetric optimizer stack's rules: each update transforms as its block's symmetry group says.

For a rule ``U`` and a group element acting on the parameter (``W -> A W B^T``, an expert permutation, a
shared shift of the router rows), the gradient transforms the same way, and the update must follow:
``U(A G B^T) = A U(G) B^T``. Newton-Schulz is an odd matrix polynomial of the Frobenius-normalised input,
so the spectral rules are equivariant up to float error; fp32 matmuls (``highest``) keep that ~1e-5.
"""

import pytest
import torch

from moe_erc.training import symmetric
from moe_erc.training.symmetric import apply_rule

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


def _centered_row_norm_step(g, m, beta):
    """megatron's Muon momentum with Nesterov, then centred row-norm x sqrt(in) x the extra factor 0.2."""
    nesterov = (1 - beta) * g + beta * m
    c = nesterov - nesterov.mean(0)
    u = c / c.norm(dim=1, keepdim=True) * c.shape[1] ** 0.5
    return 0.2 * (u - u.mean(0))


def _centered_row_unit_step(g, m, beta):
    """The authors' RowNormM: the EMA momentum itself (no Nesterov), centred unit rows, no extra scale."""
    c = m - m.mean(0)
    u = c / (c.norm(dim=1, keepdim=True) + 1e-8)
    return u - u.mean(0)


@pytest.mark.parametrize("rule, update", [("centered_row_norm", _centered_row_norm_step),
                                          ("centered_row_unit", _centered_row_unit_step)])
def test_two_optimizer_steps_match_a_hand_computed_update(rule, update):
    """SymmetricMuon = megatron's momentum ``m = b m + (1 - b) g`` + decoupled weight decay ``w (1 - lr wd)`` +
    the rule (megatron's Nesterov mix for ours, the plain momentum for the authors')."""
    w0, g1, g2 = grad(8, 16, seed=20), grad(8, 16, seed=21), grad(8, 16, seed=22)
    param = torch.nn.Parameter(w0.clone())
    param.symmetry_rule = rule
    lr, wd, beta = 0.05, 0.1, 0.9
    opt = symmetric.SymmetricMuon([param], lr=lr, momentum=beta, nesterov=True, weight_decay=wd,
                                  fp32_matmul_prec="highest", extra_scale_factor=0.2)
    w, m = w0.clone(), torch.zeros_like(w0)
    for g in (g1, g2):
        param.grad = g.clone()
        opt.step()
        m = beta * m + (1 - beta) * g
        w = w * (1 - lr * wd) - lr * update(g, m, beta)
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


# ---------------------------------------------------------------- the authors' rules (symmetric_preset: paper)


def svd_polar(x: torch.Tensor) -> torch.Tensor:
    """``U V^T`` over the singular values that are not zero (float64 SVD): the exact polar factor."""
    u, s, vh = torch.linalg.svd(x.double(), full_matrices=False)
    keep = s > 1e-9 * s.max()
    return (u[:, keep] @ vh[keep]).float()


def test_the_authors_row_rules_are_their_formulas_row_by_row():
    """RowNormM: ``m_i / (|m_i| + 1e-8)``; centred: the mean row removed before and after (rows loop by hand)."""
    g = grad(6, 5, seed=30)
    g[2] = 0.0  # a token absent from the batch: no update
    unit = apply_rule("row_unit", g)
    for i in range(6):
        norm = sum(v * v for v in g[i].tolist()) ** 0.5
        close(unit[i], g[i] / (norm + 1e-8), tol=1e-6)
    assert unit[2].abs().max() == 0
    mean = sum(g[i] for i in range(6)) / 6
    rows = [(g[i] - mean) / ((g[i] - mean).norm() + 1e-8) for i in range(6)]
    rows_mean = sum(rows) / 6
    close(apply_rule("centered_row_unit", g), torch.stack([r - rows_mean for r in rows]), tol=1e-6)


def test_left_polar_nuclear_is_the_nuclear_norm_times_the_left_spectral_direction():
    """LeftPolarGradM with alpha = 1: ``|C|_* U V^T`` of the centred momentum (SVD), recentred; the scale is
    the raw nuclear norm, no shape factor. Polar Express run to convergence (its last, repeated step is the
    classic convergent quintic) makes polar exact."""
    g = grad(5, 9, seed=31)
    c = g - g.mean(0)
    nuclear = torch.linalg.svdvals(c.double()).sum().item()
    expected = nuclear * svd_polar(c)
    expected = expected - expected.mean(0)
    got = apply_rule("left_polar_nuclear", g, steps=30, coefficient_type="polar_express")
    close(got, expected, tol=1e-4)
    close(got.sum(0), torch.zeros(9), tol=1e-5)  # the shared shift never moves
    shifted = apply_rule("left_polar_nuclear", g + torch.randn(1, 9), steps=30, coefficient_type="polar_express")
    close(shifted, got, tol=1e-4)


@pytest.mark.parametrize("layout", ["rows", "cols"])
def test_spectral_heads_orthogonalizes_each_attention_head_with_its_own_shape_scale(layout):
    """QKV: every ``head_dim`` rows are one head; projection: every ``head_dim`` columns. Each block gets
    ``polar`` and Keller Jordan's ``max(1, out/in)^0.5`` on the block's shape (their Muon per head)."""
    hd, heads, width = 3, 4, 8
    g = grad(heads * hd, width, seed=32) if layout == "rows" else grad(width, heads * hd, seed=32)
    got = apply_rule("spectral_heads", g, steps=30, coefficient_type="polar_express", scale_mode="shape_scaling",
                     head_dim=hd, head_layout=layout)
    for h in range(heads):
        block = g[h * hd:(h + 1) * hd] if layout == "rows" else g[:, h * hd:(h + 1) * hd]
        out = got[h * hd:(h + 1) * hd] if layout == "rows" else got[:, h * hd:(h + 1) * hd]
        scale = max(1.0, block.shape[0] / block.shape[1]) ** 0.5
        close(out, scale * svd_polar(block), tol=1e-4)


@pytest.mark.parametrize("name, shape, cls, paper, control", [
    ("embedding.word_embeddings.weight", (64, 8), "embedding", "row_unit", "adamw"),
    ("output_layer.weight", (64, 8), "output_layer", "centered_row_unit", "adamw"),
    ("decoder.layers.1.mlp.router.weight", (4, 8), "router", "centered_row_unit", "adamw"),
    ("decoder.layers.0.self_attention.linear_qkv.weight", (24, 8), "attention", "spectral_heads", "spectral_heads"),
    ("decoder.layers.0.self_attention.linear_proj.weight", (8, 8), "attention", "spectral_heads", "spectral_heads"),
    ("decoder.layers.1.mlp.experts.weight1", (4, 32, 8), "experts", "spectral", "spectral"),
    ("decoder.layers.1.mlp.experts.local_experts.3.linear_fc2.weight", (8, 16), "experts", "spectral", "spectral"),
    ("decoder.layers.1.mlp.shared_experts.linear_fc1.weight", (32, 8), "shared_experts", "spectral", "spectral"),
    ("decoder.layers.0.mlp.linear_fc1.weight", (32, 8), "mlp", "spectral", "spectral"),
    ("decoder.layers.0.self_attention.q_layernorm.weight", (8,), "vectors", "adamw", "adamw"),
])
def test_the_presets_assign_the_authors_rules_per_class(name, shape, cls, paper, control):
    from moe_erc.config import load_config, param_class_settings as resolve
    from moe_erc.training.param_groups import param_class

    param = torch.nn.Parameter(torch.empty(shape))
    assert param_class(name, param) == cls
    for preset, rule in (("paper", paper), ("paper_adamw_control", control)):
        rules = resolve(load_config(None, [f"optimizer.symmetric_preset={preset}"]))[0]
        assert symmetric.rule_for(name, param, "symmetric", class_rules=rules) == rule


def test_preset_entries_yield_to_explicit_ones_and_a_sigmoid_router_is_not_centred():
    from moe_erc.config import UpdateRule, load_config, param_class_settings as resolve

    assert set(UpdateRule.__args__) == set(symmetric.RULES)
    cfg = load_config(None, ["optimizer.symmetric_preset=paper", "optimizer.param_rules={router: left_polar_nuclear}",
                             "optimizer.param_lr={embedding: 0.1}", "optimizer.muon_extra_scale_factor=0.5"])
    rules, lrs, wds = resolve(cfg)
    assert (rules["router"], lrs["embedding"], lrs["router"], wds["router"]) == ("left_polar_nuclear", 0.1, 7.5e-4, 0.0)
    assert (cfg.optimizer.name, cfg.optimizer.muon_scale_mode, cfg.optimizer.muon_extra_scale_factor) == \
        ("symmetric", "shape_scaling", 0.5)
    sigmoid = load_config(None, ["optimizer.symmetric_preset=paper", "moe.moe_router_score_function=sigmoid"])
    assert resolve(sigmoid)[0]["router"] == "row_unit"


def test_each_class_gets_its_learning_rate_and_decay_through_megatrons_param_groups():
    """megatron's own grouping (``_get_param_groups``) with our overrides, then its scheduler: at the end of
    warmup every class runs at its lr, at the end of decay at lr_c * min_lr / lr; decay follows wd_c."""
    import torch.distributed as dist
    from megatron.core.optimizer import OptimizerConfig, _get_param_groups
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from moe_erc.config import load_config
    from moe_erc.training.param_groups import megatron_overrides, tag_classes

    cfg = load_config(None, ["optimizer.symmetric_preset=paper", "optimizer.lr=3e-3", "optimizer.min_lr=3e-4",
                             "optimizer.weight_decay=0.1"])
    model = torch.nn.Module()
    shapes = {"embedding.word_embeddings.weight": (16, 4), "output_layer.weight": (16, 4),
              "decoder.layers.0.mlp.router.weight": (4, 4), "decoder.layers.0.mlp.experts.weight1": (4, 8, 4),
              "decoder.layers.0.self_attention.linear_qkv.weight": (12, 4), "decoder.final_layernorm.weight": (4,)}
    for name, shape in shapes.items():
        model.register_parameter(name.replace(".", "_"), torch.nn.Parameter(torch.zeros(shape)))
    named = dict(zip(shapes, model.parameters()))
    model.named_parameters = lambda: iter(named.items())
    tag_classes([model])
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        groups = _get_param_groups([model], OptimizerConfig(lr=3e-3, min_lr=3e-4, weight_decay=0.1),
                                   megatron_overrides(cfg))
    finally:
        dist.destroy_process_group()
    opt = torch.optim.AdamW([{**g, "params": g["params"]} for g in groups], lr=3e-3, weight_decay=0.1)
    sched = OptimizerParamScheduler(opt, init_lr=0.0, max_lr=3e-3, min_lr=3e-4, lr_warmup_steps=2,
                                    lr_decay_steps=10, lr_decay_style="cosine", start_wd=0.1, end_wd=0.1,
                                    wd_incr_steps=10, wd_incr_style="constant")
    expected = {"embedding": (0.5, 0.0), "output_layer": (5e-3, 0.0), "router": (7.5e-4, 0.0),
                "experts": (5e-3, 1e-3), "attention": (5e-3, 1e-3), "vectors": (1e-2, 1e-3)}

    def by_class():
        return {p.param_class: (g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}

    sched.step(2)
    for cls, (lr, wd) in by_class().items():
        assert lr == pytest.approx(expected[cls][0]) and wd == pytest.approx(expected[cls][1]), cls
    sched.step(8)
    for cls, (lr, _) in by_class().items():
        assert lr == pytest.approx(expected[cls][0] * 0.1), cls
