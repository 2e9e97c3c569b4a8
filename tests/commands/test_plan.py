"""`moe-erc plan` on the paper's configs, layout refusals, and the GPU/CPU spec selection."""

import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def _plan(*args):
    from launch import cli

    return cli("plan", *args)


TOKENS = 768 * 4096  # global batch x sequence length of both paper configs
GiB = 2**30


def _plan_json(*args):
    proc = _plan(*args, "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("config, total, active, share, hand", [
    # hand: the paper's accounting n^2 edp / (3 K T) (ERC gate GEMMs vs routed experts' forward per GPU)
    ("erc-3b.yaml", 3.0e9, 500e6, 0.0018, 64 * 64 * 32 / (3 * 8 * TOKENS)),
    ("erc-15b.yaml", 15.0e9, 700e6, 0.0072, 256 * 256 * 8 / (3 * 8 * TOKENS)),
])
def test_plan_matches_the_papers_sizes_and_erc_share(config, total, active, share, hand):
    plan = _plan_json(f"configs/{config}")
    assert plan["total_params"] == pytest.approx(total, rel=0.10)
    assert plan["active_params"] == pytest.approx(active, rel=0.10)
    assert plan["method"] == "ERC"
    assert plan["erc_flop_share"] == pytest.approx(hand, rel=1e-12)
    assert abs(plan["erc_flop_share"] - share) <= 0.0005  # within 0.05 percentage points of the paper
    # ERC's 4 GEMMs per layer and step against all of the model's training FLOPs on one GPU
    d, n, ep, world, layers, D = (1536, 64, 1, 32, 12, 768) if "3b" in config else (1536, 256, 8, 64, 24, 512)
    erc = layers * 4 * 2 * n * (n / ep) * d * D
    assert plan["erc_share_of_model_flops"] == pytest.approx(erc / (plan["flops_per_token"] * TOKENS / world),
                                                             rel=1e-12)
    assert plan["method_costs"]["ERC"]["erc_tflop"] == pytest.approx(erc / 1e12, rel=1e-12)
    assert plan["method_costs"]["top-k / aux-free"]["erc_tflop"] == 0
    assert plan["memory_gib"]["total_distributed_optimizer"] < plan["memory_gib"]["total"]
    # the headline follows the config: both configs use the distributed optimizer, plus activations
    assert plan["distributed_optimizer"] is True
    assert plan["memory_gib"]["per_gpu_total"] == pytest.approx(
        plan["memory_gib"]["total_distributed_optimizer"] + plan["activation_gib_per_microbatch"], abs=2e-3)
    assert plan["activation_gib_per_microbatch"] > 0 and plan["flops_per_token"] > 6 * plan["active_params"]
    assert any("input embedding" in line for line in plan["flop_assumptions"])


def test_plan_models_aoe_scoring_wider_experts_recompute_and_cache():
    """AoE at the 3B shapes, EP=1 and EP=8: every token scored by all n experts (2 n d r), experts of width
    D' continuing from the low-rank activation, recompute of x Wdown_e at EP > 1, the [T, n r] cache kept."""
    d, n, K, r, layers, s, b, D = 1536, 64, 8, 512, 12, 4096, 2, 768
    D_aoe = round((d + 3 * d * D - d * r) / (r + 2 * d))  # parameters matched to router + SwiGLU expert: 768
    ep1 = _plan_json("configs/erc-3b.yaml", "moe.router=aoe", "erc.enabled=false")
    ep8 = _plan_json("configs/erc-3b.yaml", "moe.router=aoe", "erc.enabled=false",
                     "parallel.expert_model_parallel_size=8")
    for plan in (ep1, ep8):
        assert plan["method"] == "AoE" and plan["erc_flop_share"] is None and plan["erc_share_of_model_flops"] is None
        assert plan["params"]["router"] == layers * n * r * d  # every expert's Wdown
        assert plan["params"]["experts"] == layers * n * (r * D_aoe + 2 * d * D_aoe)
        parts = plan["flops_per_token_parts"]
        assert parts["router"] == 3 * layers * 2 * n * d * r
        assert parts["experts"] == 3 * layers * K * 2 * D_aoe * (r + 2 * d)
    assert ep1["flops_per_token_parts"]["aoe_recompute"] == 0
    assert ep8["flops_per_token_parts"]["aoe_recompute"] == 3 * layers * K * 2 * d * r
    top_k = ep1["method_costs"]["top-k / aux-free"]
    moe_topk = TOKENS / 32 * 3 * layers * (2 * n * d + K * 2 * 3 * d * D) / 1e12
    moe_aoe = TOKENS / 32 * 3 * layers * (2 * n * d * r + K * 2 * D_aoe * (r + 2 * d)) / 1e12
    assert top_k["moe_tflop"] == pytest.approx(moe_topk, rel=1e-12)
    assert ep1["method_costs"]["AoE"]["moe_tflop"] == pytest.approx(moe_aoe, rel=1e-12)
    assert ep1["method_costs"]["AoE"]["moe_vs_topk"] == pytest.approx(moe_aoe / moe_topk, rel=1e-12)  # ~2.55x
    assert ep8["method_costs"]["AoE"]["moe_tflop"] == pytest.approx(
        moe_aoe + TOKENS / 32 * 3 * layers * K * 2 * d * r / 1e12, rel=1e-12)
    # Activations: the bf16 [T, n r] cache and the K selected [T, r] pieces per layer on top of top-k's
    # (D' = D here, so the expert activations are the same).
    cache = layers * (2 * s * b * n * r + 2 * K * s * b * r) / GiB
    assert ep1["activation_gib_per_microbatch"] == pytest.approx(top_k["activation_gib_per_microbatch"] + cache,
                                                                 abs=2e-3)
    assert ep1["method_costs"]["AoE"]["activation_gib_per_microbatch"] == pytest.approx(
        ep1["activation_gib_per_microbatch"], abs=2e-3)


def test_plan_models_kmeans_cosine_scoring_without_router_parameters():
    d, n, K, layers, D = 1536, 64, 8, 12, 768
    plan = _plan_json("configs/erc-3b.yaml", "moe.router=kmeans", "erc.enabled=false",
                      "moe.moe_router_load_balancing_type=none")
    assert plan["method"] == "K-Means" and plan["erc_flop_share"] is None
    assert plan["params"]["router"] == 0
    parts = plan["flops_per_token_parts"]
    assert parts["router"] == 2 * layers * 2 * n * d  # cosine forward + input gradient; nothing to train
    assert parts["experts"] == 3 * layers * K * 2 * 3 * d * D
    assert plan["method_costs"]["K-Means"]["moe_tflop"] == pytest.approx(
        TOKENS / 32 * (parts["router"] + parts["experts"]) / 1e12, rel=1e-12)
    printed = _plan("configs/erc-3b.yaml", "moe.router=kmeans", "erc.enabled=false",
                    "moe.moe_router_load_balancing_type=none")
    assert printed.returncode == 0, printed.stderr[-2000:]
    table = printed.stdout.split("per method at these shapes")[1].split("\n\n")[0].splitlines()[2:]
    assert [row.split()[0] for row in table] == ["top-k", "ERC", "AoE", "*"]  # every method, this one marked
    assert table[-1].split()[1] == "K-Means"
    assert "FLOP count assumptions" in printed.stdout and "K-Means: cosine scoring 2 n d" in printed.stdout


@pytest.mark.parametrize("args, message", [
    (["--world-size", "30", "parallel.tensor_model_parallel_size=4"], "world size 30 is not divisible"),
    (["--world-size", "30"], "expert_model_parallel_size*expert_tensor_parallel_size=8*1 must divide"),
    (["--world-size", "64", "parallel.expert_model_parallel_size=3"], "is not divisible by parallel.expert_model_parallel_size=3"),
    (["--world-size", "64", "parallel.tensor_model_parallel_size=32"], "num_attention_heads=16 is not divisible"),
    (["parallel.world_size=null"], "no world size"),
])
def test_plan_refuses_impossible_layouts_in_one_line(args, message):
    proc = _plan("configs/erc-15b.yaml", *args)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("moe-erc: error:") and message in last and "Traceback" not in proc.stderr


def test_transformer_engine_selects_the_te_spec_and_otherwise_our_grouped_experts(monkeypatch):
    """With TE: megatron's TE spec (its grouped GEMM experts). Without: the local spec with
    moe_erc.model.layers.experts.GroupedExperts swapped in, and megatron's own grouped-GEMM switch left off."""
    from moe_erc.model import gpt as model_lib
    from moe_erc.model.layers import spec
    from moe_erc.config import load_config
    from moe_erc.model.layers.experts import GroupedExperts

    seen = []

    def fake_spec(config, use_transformer_engine, **kwargs):
        seen.append(use_transformer_engine)
        return real_spec(config, use_transformer_engine=False)

    real_spec = spec.get_gpt_decoder_block_spec
    monkeypatch.setattr(spec, "get_gpt_decoder_block_spec", fake_spec)
    from moe_erc.training import parallel
    from moe_erc.compat import prepare_runtime

    cfg = load_config(None, ["moe.moe_grouped_gemm=true", "model.num_layers=1"])
    assert model_lib.transformer_config(cfg).moe_grouped_gemm is False  # no TE here
    experts = []
    parallel.initialize(cfg, prepare_runtime("cpu"))
    try:
        for have_te in (True, False):
            monkeypatch.setattr(spec, "have_transformer_engine", lambda: have_te)
            block = spec.decoder_block_spec(cfg, model_lib.transformer_config(cfg))
            experts.append(spec._moe_submodules(block.layer_specs[0]).experts)
    finally:
        parallel.destroy()
    assert seen == [True, False]
    assert experts[1] is GroupedExperts and experts[0] is not GroupedExperts


def test_plan_counts_the_symmetric_optimizers_newton_schulz_and_state():
    """erc-3b with EP=8: every rank orthogonalizes its 8 local experts' fc1 [2D, d] and fc2 [d, D] and all
    non-expert matrices but the router and the embeddings (row-wise rules); Q, K and V separately."""
    d, D, layers, n, ep = 1536, 768, 12, 64, 8

    def ns(rows, cols, steps=5):
        m, k = min(rows, cols), max(rows, cols)
        return steps * (4 * m * m * k + 2 * m ** 3)

    per_layer = (n // ep) * (ns(2 * D, d) + ns(d, D)) + 3 * ns(d, d) + ns(d, d)  # experts, Q/K/V, proj
    plan = _plan_json("configs/erc-3b.yaml", "optimizer.name=symmetric", "parallel.use_distributed_optimizer=false",
                      f"parallel.expert_model_parallel_size={ep}")
    opt = plan["optimizer"]
    assert opt["name"] == "symmetric"
    assert opt["ns_matrices_per_rank"] == layers * ((n // ep) * 2 + 4)
    assert opt["ns_tflop_per_step"] == pytest.approx(layers * per_layer / 1e12, rel=1e-5)
    # Momentum only (4 B) for matrices vs AdamW's two moments (8 B), plus the fp32 master copy (4 B) each.
    assert opt["adamw_state_gib"] == pytest.approx(plan["per_rank_params"] * 12 / GiB, rel=1e-3)
    assert 8 / 12 * opt["adamw_state_gib"] < opt["state_gib"] < opt["adamw_state_gib"]
    assert plan["memory_gib"]["optimizer"] == pytest.approx(opt["state_gib"], rel=1e-3)
    adamw = _plan_json("configs/erc-3b.yaml", f"parallel.expert_model_parallel_size={ep}")
    assert adamw["optimizer"]["ns_tflop_per_step"] == 0
    assert adamw["optimizer"]["state_gib"] == pytest.approx(opt["adamw_state_gib"], rel=1e-9)


def _hf_parameter_count(config) -> int:
    """Parameters of the transformers model of ``config`` (built on the meta device: no memory)."""
    import transformers

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("config, published_total, published_active", [
    ("olmoe-1b-7b.yaml", "6.9", "1.3"),     # OLMoE-1B-7B: "1B active, 7B total" (6.9B / 1.3B)
    ("moonlight-16b-a3b.yaml", "16", "3"),  # Moonlight-16B-A3B
])
def test_the_released_architectures_plan_to_their_published_sizes(config, published_total, published_active):
    """plan's total equals the parameters of the transformers model of the released shape (an independent
    count: its classes, its names) to 1e-4 (OLMoE's Q/K norm weights are per projection in both), and its total and
    active parameters (input embedding included, as model cards count) round to the published figures."""
    import transformers

    plan = _plan_json(f"configs/{config}")
    if config.startswith("olmoe"):
        hf = transformers.OlmoeConfig(vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
                                      num_attention_heads=16, num_experts=64, num_experts_per_tok=8,
                                      tie_word_embeddings=False)
    else:
        hf = transformers.DeepseekV3Config(
            vocab_size=163840, hidden_size=2048, intermediate_size=11264, moe_intermediate_size=1408,
            num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16, n_shared_experts=2,
            n_routed_experts=64, num_experts_per_tok=6, kv_lora_rank=512, q_lora_rank=None, qk_rope_head_dim=64,
            qk_nope_head_dim=128, v_head_dim=128, n_group=1, topk_group=1, first_k_dense_replace=1,
            routed_scaling_factor=2.446, tie_word_embeddings=False)
    assert plan["total_params"] == pytest.approx(_hf_parameter_count(hf), rel=1e-4)
    digits = len(published_total.partition(".")[2])
    assert f"{plan['total_params'] / 1e9:.{digits}f}" == published_total
    digits = len(published_active.partition(".")[2])
    assert f"{plan['active_params_with_embedding'] / 1e9:.{digits}f}" == published_active
    assert plan["erc_flop_share"] is not None and 0 < plan["erc_flop_share"] < 0.01


def test_the_activation_estimate_counts_mla_latents_grouped_kv_shared_experts_and_mtp():
    """Korthikanti's per-layer bytes written out by hand for the shapes: full multi-head attention is 11 s b h, grouped
    K/V keep less, MLA keeps its latents and per-head Q/K/V, a shared expert its MLP, an MTP layer one more layer."""
    from moe_erc.model.memory import activation_bytes
    from moe_erc.config import load_config

    base = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.seq_length=32",
            "model.ffn_hidden_size=128", "moe.num_experts=4", "moe.moe_router_topk=2", "moe.moe_ffn_hidden_size=32",
            "training.micro_batch_size=2", "training.global_batch_size=2"]
    s, b, h = 32, 2, 64
    mlp = 2 * 19 * s * b * h * 32 / (4 * h) * 1.5
    mha = 11 * s * b * h + 4 * s * b * h
    assert activation_bytes(load_config(None, base)) == pytest.approx(2 * (mha + mlp))
    gqa = 2 * s * b * (h + 64 + 2 * 16 + 64) + s * b * h + 4 * s * b * h  # 4 heads of 16, 1 K/V group
    assert activation_bytes(load_config(None, [*base, "model.num_query_groups=1"])) == pytest.approx(2 * (gqa + mlp))
    mla = ["model.multi_latent_attention=true", "model.q_lora_rank=24", "model.kv_lora_rank=16", "model.qk_head_dim=16",
           "model.qk_pos_emb_head_dim=8", "model.v_head_dim=16", "model.qk_layernorm=true"]
    latent = 2 * s * b * (h + 2 * 4 * 24 + 2 * 4 * 16 + 2 * 24 + 2 * 16 + 8) + s * b * h + 4 * s * b * h
    shared = 19 * s * b * h * 48 / (4 * h) * 1.5
    cfg = load_config(None, [*base, *mla, "moe.moe_shared_expert_intermediate_size=48", "model.mtp_num_layers=1"])
    layer = latent + mlp + shared
    assert activation_bytes(cfg) == pytest.approx(2 * layer + layer + 2 * s * b * 2 * h)
