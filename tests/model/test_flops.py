"""moe_erc/model/flops.py: one FLOP counter for `moe-erc plan` and benchmarks/erc_overhead.py, checked by hand."""

import importlib.util
import json
from pathlib import Path

import pytest

from moe_erc.config import load_config
from moe_erc.model.flops import step_flops

REPO = Path(__file__).resolve().parents[2]
TOKENS = 768 * 4096  # global batch x sequence length of both paper configs


def _benchmark():
    spec = importlib.util.spec_from_file_location("erc_overhead", REPO / "benchmarks" / "erc_overhead.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _plan_json(config: str) -> dict:
    from launch import cli

    proc = cli("plan", config, "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _by_hand(layers, n, ep, world, edp, d=1536, heads=16, s=4096, D=768, K=8, vocab=50304):
    """(paper's accounting, share of all model FLOPs, model FLOPs per token) of a SwiGLU MoE, every layer MoE."""
    # The paper's accounting: one ERC gate GEMM per layer, 2 n (n/ep) d D, against the routed experts'
    # forward on the same GPU, K T/world tokens x 3 GEMMs of 2 d D: n^2 edp / (3 K T).
    paper = (layers * 2 * n * (n / ep) * d * D) / (layers * K * TOKENS / world * 3 * 2 * d * D)
    assert paper == pytest.approx(n * n * edp / (3 * K * TOKENS), rel=1e-12)
    # Training FLOPs per token: 6 x (attention 4 d^2 + router n d + K SwiGLU experts 3 d D) per layer
    # + 6 d V (output layer; the input embedding is a lookup) + 12 s d per layer (attention scores).
    per_token = 6 * layers * (4 * d * d + n * d + K * 3 * d * D) + 6 * d * vocab + 12 * layers * s * d
    erc = layers * 4 * 2 * n * (n / ep) * d * D  # 4 GEMMs per layer and step on every GPU
    return paper, erc / (per_token * TOKENS / world), per_token


@pytest.mark.parametrize("config, hand", [
    ("configs/erc-3b.yaml", dict(layers=12, n=64, ep=1, world=32, edp=32, D=768)),
    ("configs/erc-15b.yaml", dict(layers=24, n=256, ep=8, world=64, edp=8, D=512)),
])
def test_erc_share_at_the_paper_configs_equals_the_hand_computation(config, hand):
    paper, model, per_token = _by_hand(**hand)
    cfg = load_config(REPO / config, [])
    f = step_flops(cfg, cfg.parallel.world_size)
    assert f.erc_share_paper == pytest.approx(paper, rel=1e-12)
    assert f.erc_share_model == pytest.approx(model, rel=1e-12)
    assert f.per_token_total == per_token
    # The numbers the docs quote (3B: 0.174 % / 0.115 %, 15B: 0.694 % / 0.393 %) and the paper's 0.18 / 0.72 %.
    expected = {"configs/erc-3b.yaml": (0.00174, 0.00115, 0.0018), "configs/erc-15b.yaml": (0.00694, 0.00393, 0.0072)}
    quoted_paper, quoted_model, published = expected[config]
    assert round(paper, 5) == quoted_paper and round(model, 5) == quoted_model
    assert abs(paper - published) < 0.0003
    # With exactly 3.0M tokens per step (the paper's "3M-token batches") the accounting gives 0.182 / 0.728 %.
    exact = paper * TOKENS / 3.0e6
    assert round(100 * exact, 3) == {"configs/erc-3b.yaml": 0.182, "configs/erc-15b.yaml": 0.728}[config]


@pytest.mark.parametrize("config", ["configs/erc-3b.yaml", "configs/erc-15b.yaml"])
def test_plan_and_the_benchmark_count_the_same_flops(config):
    plan = _plan_json(config)
    bench = _benchmark().layout_flops(REPO / config, [])
    assert plan["erc_flop_share"] == pytest.approx(bench.erc_share_paper, rel=1e-12)
    assert plan["erc_share_of_model_flops"] == pytest.approx(bench.erc_share_model, rel=1e-12)
    assert plan["flops_per_token"] == bench.per_token_total
    assert plan["flop_assumptions"][:5] == bench.assumptions.lines()[:5]


def test_the_benchmark_prints_both_shares_and_the_assumptions(capsys):
    _benchmark().bench_flops()
    out = capsys.readouterr().out
    rows = {line.split(" | ")[0].strip("| "): line for line in out.splitlines() if line.startswith("| ")}
    assert rows["3B (dp=32, ep=1)"].endswith("| 0.174 % | 0.115 % |")
    assert rows["15B (dp=64, ep=8)"].endswith("| 0.694 % | 0.393 % |")
    for phrase in ("sequence length 4096; vocabulary 50304 (padded)", "attention: Q K^T and A V",
                   "input embedding: a lookup, 0 FLOPs", "4 GEMMs of 2 n (n/ep) d (D/etp)", "paper's accounting"):
        assert phrase in out


def test_aoe_and_kmeans_scoring_costs_by_hand():
    """3B shapes: AoE scores every token with all n experts (2 n d r), K-Means with n cosines (2 n d)."""
    cfg = load_config(REPO / "configs/erc-3b.yaml", ["erc.enabled=false"])
    d, n, K, r, layers = 1536, 64, 8, 512, 12
    D_aoe = round((d + 3 * d * 768 - d * r) / (r + 2 * d))  # parameter-matched width: 768.4 -> 768
    aoe = step_flops(cfg.model_copy(update={"moe": cfg.moe.model_copy(update={"router": "aoe"})}), 32)
    assert aoe.per_token["router"] == 3 * layers * 2 * n * d * r
    assert aoe.per_token["experts"] == 3 * layers * K * 2 * D_aoe * (r + 2 * d)
    assert aoe.per_token["aoe_recompute"] == 0 and aoe.erc_per_gpu == 0
    ep8 = cfg.model_copy(update={"moe": cfg.moe.model_copy(update={"router": "aoe"}),
                                 "parallel": cfg.parallel.model_copy(update={"expert_model_parallel_size": 8})})
    assert step_flops(ep8, 32).per_token["aoe_recompute"] == 3 * layers * K * 2 * d * r
    dropping = cfg.model_copy(update={"moe": cfg.moe.model_copy(update={"router": "aoe",
                                                                        "moe_expert_capacity_factor": 1.0})})
    assert step_flops(dropping, 32).per_token["aoe_recompute"] == 3 * layers * K * 2 * d * r  # no cache reuse
    kmeans = step_flops(cfg.model_copy(update={"moe": cfg.moe.model_copy(update={"router": "kmeans"})}), 32)
    assert kmeans.per_token["router"] == 2 * layers * 2 * n * d  # forward + input gradient, no weight
    assert kmeans.per_token["experts"] == 3 * layers * K * 2 * 3 * d * 768
    topk = step_flops(cfg, 32)
    moe = lambda f: f.per_token["router"] + f.per_token["experts"] + f.per_token["aoe_recompute"]  # noqa: E731
    assert moe(aoe) / moe(topk) == pytest.approx(
        (2 * n * d * r + K * 2 * D_aoe * (r + 2 * d)) / (2 * n * d + K * 6 * d * 768), rel=1e-12)
    assert 2.4 < moe(aoe) / moe(topk) < 2.7  # AoE's "about 2.5x" the experts' FLOPs (docs/baselines.md)


def test_attention_flops_follow_mla_head_sizes_and_the_window_pattern():
    """Per token and layer forward: MLA's projections and scores by hand; a window counts min(s, W + 1) keys in
    the layers megatron windows (window_attn_skip_freq: every 2nd layer full; a list: 1 = windowed)."""
    from moe_erc.config import load_config
    from moe_erc.model.flops import attention_forward

    base = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.seq_length=32"]
    mla = load_config(None, base + ["model.multi_latent_attention=true", "model.kv_lora_rank=16", "model.q_lora_rank=24",
                                    "model.qk_head_dim=16", "model.qk_pos_emb_head_dim=8", "model.v_head_dim=16",
                                    "model.qk_layernorm=true"])
    projections, scores = attention_forward(mla)
    assert projections == 2 * (64 * 24 + 24 * 4 * 24 + 64 * (16 + 8) + 16 * 4 * (16 + 16) + 4 * 16 * 64)
    assert scores == [2 * 32 * 4 * (24 + 16)] * 2
    for skip, windowed in (("2", [True, False]), ("[0,1]", [False, True])):
        cfg = load_config(None, base + ["model.window_size=[7,0]", f"model.window_attn_skip_freq={skip}"])
        _, scores = attention_forward(cfg)
        assert scores == [2 * (8 if w else 32) * 4 * 32 for w in windowed]
