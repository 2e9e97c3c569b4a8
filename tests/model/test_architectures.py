"""The architecture features of today's open MoE models on the local spec (docs/architectures.md): each builds,
runs forward and backward on the attention the config picks; ERC on a DeepSeek-style model (MLA, a dense first
layer, shared experts, group-limited sigmoid routing with expert bias, routed scaling, multi-token prediction) is
defined on the routed experts only, and the model trains with ERC under EP=2 and TP=2 as in one process."""

import math
from pathlib import Path

import pytest
import torch

from launch import REPO, losses, records, train

# configs/tiny-deepseek.yaml at the tests' TINY shapes (2 layers: the first dense), 4 experts in 4 groups.
DEEPSEEK = REPO / "configs" / "tiny-deepseek.yaml"
DEEPSEEK_TINY = ["model.moe_layer_freq=[0,1]", "model.kv_lora_rank=16", "model.qk_head_dim=16",
                 "model.qk_pos_emb_head_dim=8", "model.v_head_dim=16", "moe.moe_shared_expert_intermediate_size=32",
                 "moe.moe_ffn_hidden_size=64"]
SHAPES = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.ffn_hidden_size=128",
          "model.seq_length=32", "moe.num_experts=4", "moe.moe_router_topk=2", "moe.moe_ffn_hidden_size=64",
          "training.micro_batch_size=2", "training.global_batch_size=2"]
MLA = ["model.multi_latent_attention=true", "model.kv_lora_rank=16", "model.qk_head_dim=16",
       "model.qk_pos_emb_head_dim=8", "model.v_head_dim=16", "model.qk_layernorm=true"]
FEATURES = {  # name: (overrides, the core attention auto picks without transformer-engine, a parameter it adds)
    "mla-uncompressed-q": (MLA, "sdpa", "self_attention.linear_q_proj.weight"),
    "mla-q-lora-yarn": (MLA + ["model.q_lora_rank=24", "model.rope_type=yarn", "model.rotary_scaling_factor=4",
                               "model.mscale=0.707", "model.mscale_all_dim=0.707",
                               "model.original_max_position_embeddings=16"], "sdpa", "self_attention.q_layernorm.weight"),
    "shared-expert-gate": (["moe.moe_shared_expert_intermediate_size=32", "moe.moe_shared_expert_gate=true"], "sdpa",
                           "mlp.shared_experts.gate_weight"),
    "group-routing": (["moe.num_experts=8", "moe.moe_router_topk=4", "moe.moe_router_num_groups=4",
                       "moe.moe_router_group_topk=2", "moe.moe_router_topk_scaling_factor=2.5",
                       "moe.moe_router_score_function=sigmoid", "moe.moe_router_enable_expert_bias=true",
                       "moe.moe_router_load_balancing_type=none"], "sdpa", "mlp.router.weight"),
    "qkv-bias-partial-rotary": (["model.add_qkv_bias=true", "model.rotary_percent=0.5"], "sdpa",
                                "self_attention.linear_qkv.bias"),
    "window-pattern-sinks": (["model.window_size=[7,0]", "model.window_attn_skip_freq=2",
                              "model.softmax_type=learnable"], "local", "self_attention.core_attention.softmax_offset"),
    "clamped-quick-gelu": (["model.activation=quick_gelu", "model.activation_func_clamp_value=7.0",
                            "model.glu_linear_offset=1.0", "moe.moe_grouped_gemm=true"], "sdpa", "mlp.experts.weight1"),
    # gpt-oss's biases on every linear (grouped-GEMM experts, the router) and yarn on standard attention
    "biases-yarn": (["model.add_bias_linear=true", "moe.moe_grouped_gemm=true", "model.rope_type=yarn",
                     "model.rotary_scaling_factor=8", "model.original_max_position_embeddings=16",
                     "model.yarn_correction_range_round_to_int=false"], "sdpa", "mlp.experts.bias2"),
    "head-size": (["model.kv_channels=32"], "sdpa", "self_attention.linear_qkv.weight"),
    "olmoe-qk-norm": (["model.qk_layernorm=true", "model.qk_layernorm_over=projection", "model.num_query_groups=2"],
                      "sdpa", "self_attention.k_layernorm.weight"),
    "mtp": (["model.mtp_num_layers=1"], "sdpa", "mlp.router.weight"),
    # the other routers with a shared expert (and MTP's extra MoE layer)
    "kmeans-shared-mtp": (["moe.router=kmeans", "moe.moe_router_load_balancing_type=none",
                           "moe.moe_shared_expert_intermediate_size=32", "model.mtp_num_layers=1"], "sdpa",
                          "mlp.shared_experts.linear_fc1.weight"),
    "aoe-shared": (["moe.router=aoe", "moe.moe_shared_expert_intermediate_size=32"], "sdpa",
                   "mlp.shared_experts.linear_fc1.weight"),
}


@pytest.mark.parametrize("feature", list(FEATURES))
def test_each_feature_builds_and_runs_forward_and_backward(feature):
    from moe_erc.config import load_config
    from moe_erc.model import gpt
    from moe_erc.model.layers.spec import attention_backend
    from moe_erc.training import parallel

    overrides, backend, parameter = FEATURES[feature]
    cfg = load_config(None, SHAPES + overrides)
    assert attention_backend(cfg) == backend
    with parallel.one_process(cfg):
        net = gpt.build_model(cfg, gpt.transformer_config(cfg), 128)
        names = dict(net.named_parameters())
        assert f"decoder.layers.1.{parameter}" in names, sorted(names)[:20]
        if feature == "mtp":
            assert any(name.startswith("mtp.layers.0.") for name in names)
        tokens = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
        loss = net(tokens, torch.arange(32).expand(2, 32), None, labels=tokens)
        assert loss.shape == (2, 32) and torch.isfinite(loss).all()
        loss.mean().backward()
        assert names[f"decoder.layers.1.{parameter}"].grad is not None


def test_qk_norm_over_the_projection_matches_a_direct_computation():
    from moe_erc.config import load_config
    from moe_erc.model import gpt
    from moe_erc.model.layers.qk_norm import KeyProjectionNorm, QueryProjectionNorm
    from moe_erc.training import parallel

    cfg = load_config(None, SHAPES + FEATURES["olmoe-qk-norm"][0])
    with parallel.one_process(cfg):
        tf = gpt.transformer_config(cfg)
        for cls, heads in ((QueryProjectionNorm, 4), (KeyProjectionNorm, 2)):
            norm = cls(hidden_size=16, config=tf, eps=1e-5)
            assert norm.weight.shape == (heads * 16,)  # one weight per element of the whole projection
            with torch.no_grad():
                norm.weight.copy_(torch.linspace(0.5, 1.5, heads * 16))
            x = torch.randn(5, 3, heads, 16, dtype=torch.float64).float()
            flat = x.reshape(5, 3, heads * 16).double()
            expected = flat / torch.sqrt(flat.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight.double()
            torch.testing.assert_close(norm(x).reshape(5, 3, -1).double(), expected, rtol=1e-6, atol=1e-6)


def test_erc_acts_on_the_routed_experts_with_unbiased_router_rows_in_every_routed_layer():
    """docs/erc.md: per MoE layer (the MTP layer's included) ERC is the loss of the router rows -- without the
    expert bias -- against the routed experts' gate weights; the shared expert and the bias take no part."""
    from moe_erc.config import load_config
    from moe_erc.model import erc, gpt
    from moe_erc.model.layers import erc_layer
    from moe_erc.training import parallel

    cfg = load_config(str(DEEPSEEK), SHAPES + DEEPSEEK_TINY + ["erc.noise=false", "erc.alpha=0.5"])
    with parallel.one_process(cfg):
        net = gpt.build_model(cfg, gpt.transformer_config(cfg), 128)
        net.train()
        tokens = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))

        def layer_losses(step):
            erc_layer.set_training_step(step)
            net(tokens, torch.arange(32).expand(2, 32), None, labels=tokens)
            return {erc_layer.layer_slot(m): float(m.erc_stats["erc_loss"]) for m in net.modules()
                    if isinstance(m, erc_layer.ERCRouter)}

        routers = {erc_layer.layer_slot(m): m for m in net.modules() if isinstance(m, erc_layer.ERCRouter)}
        assert sorted(routers) == [2, 3]  # decoder layer 2 (layer 1 is dense) and the MTP layer, in its own row
        first = layer_losses(0)
        for slot, router in routers.items():
            moe = next(m for m in net.modules() if getattr(m, "router", None) is router)
            gate = erc_layer.gate_weights(moe.experts, True)
            expected = erc.erc_loss(router.weight.detach(), gate, alpha=0.5, noise=False)
            assert first[slot] > 0 and first[slot] == pytest.approx(float(expected.detach()), rel=1e-6, abs=1e-9)
        with torch.no_grad():  # the expert bias and the shared experts change; the ERC loss does not
            for m in net.modules():
                if isinstance(m, erc_layer.ERCRouter):
                    m.expert_bias.add_(torch.linspace(-1, 1, m.expert_bias.numel()))
            for name, p in net.named_parameters():
                if "shared_experts" in name:
                    p.mul_(3.0)
        assert layer_losses(1) == pytest.approx(first, rel=1e-6, abs=1e-9)


def test_erc_takes_no_part_of_the_router_and_expert_biases():
    """docs/erc.md (gpt-oss): with biases on every linear the ERC loss is still the router rows' against the gate
    weights, and moving the router's bias and the experts' biases leaves it unchanged."""
    from moe_erc.config import load_config
    from moe_erc.model import erc, gpt
    from moe_erc.model.layers import erc_layer
    from moe_erc.training import parallel

    cfg = load_config(None, SHAPES + ["model.add_bias_linear=true", "moe.moe_grouped_gemm=true", "erc.enabled=true",
                                      "erc.noise=false", "erc.alpha=0.5"])
    with parallel.one_process(cfg):
        net = gpt.build_model(cfg, gpt.transformer_config(cfg), 128)
        net.train()
        tokens = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))

        def layer_losses():
            net(tokens, torch.arange(32).expand(2, 32), None, labels=tokens)
            return [float(m.erc_stats["erc_loss"]) for m in net.modules() if isinstance(m, erc_layer.ERCRouter)]

        first = layer_losses()
        moes = [m for m in net.modules() if isinstance(getattr(m, "router", None), erc_layer.ERCRouter)]
        for loss, moe in zip(first, moes):
            expected = erc.erc_loss(moe.router.weight.detach(), erc_layer.gate_weights(moe.experts, True), alpha=0.5,
                                    noise=False)
            assert loss > 0 and loss == pytest.approx(float(expected.detach()), rel=1e-6)
        with torch.no_grad():
            for moe in moes:
                moe.router.bias.add_(torch.linspace(-1, 1, moe.router.bias.numel()))
                moe.experts.bias1.add_(0.5)
                moe.experts.bias2.add_(0.5)
        assert layer_losses() == pytest.approx(first, rel=1e-6)


@pytest.fixture(scope="module")
def deepseek_reference(tiny_corpus, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("deepseek") / "run"
    train(run_dir, tiny_corpus, *DEEPSEEK_TINY, "training.train_iters=3", config=DEEPSEEK)
    return run_dir


def test_the_deepseek_style_model_trains_with_erc_and_logs_every_routed_layer(deepseek_reference):
    rows = records(deepseek_reference)
    assert [r["step"] for r in rows] == [1, 2, 3]
    last = rows[-1]
    assert math.isnan(last["erc_loss_per_layer"][0]) and len(last["erc_loss_per_layer"]) == 3  # dense, MoE, MTP
    assert all(v >= 0 for v in last["erc_loss_per_layer"][1:])
    assert last["mtp_loss"] > 0 and len(last["mtp_loss_per_layer"]) == 1
    assert last["seq_load_balancing_loss"] > 0 and last["expert_bias_norm"] >= 0
    assert all(math.isfinite(r["lm_loss"]) for r in rows)


@pytest.mark.parametrize("layout", [["parallel.expert_model_parallel_size=2"],
                                    ["parallel.tensor_model_parallel_size=2"]], ids=["ep2", "tp2"])
def test_the_deepseek_style_model_with_erc_matches_one_process(deepseek_reference, tiny_corpus, tmp_path, layout):
    """Weights of the reference's checkpoint, resharded; steps 1 and 2 (forward; gradients with ERC, MTP and the
    shared expert; the optimizer) log the same losses as one process."""
    start = [*DEEPSEEK_TINY, "training.train_iters=2", "training.resume=none",
             f"checkpoint.load={deepseek_reference / 'checkpoints'}"]
    one, two = tmp_path / "one", tmp_path / "two"
    train(one, tiny_corpus, *start, config=DEEPSEEK)
    train(two, tiny_corpus, *start, *layout, nproc=2, config=DEEPSEEK)
    expected, got = losses(one), losses(two)
    assert expected.keys() == got.keys() == {1, 2}
    for step in (1, 2):
        assert got[step] == pytest.approx(expected[step], rel=2e-5), (step, expected, got)
    mtp_one, mtp_two = records(one)[-1]["mtp_loss"], records(two)[-1]["mtp_loss"]
    assert mtp_two == pytest.approx(mtp_one, rel=2e-5)


def test_the_gpt_oss_style_config_trains_with_erc_on_megatrons_attention(tiny_corpus, tmp_path):
    """configs/tiny-gpt-oss.yaml (windows every other layer, sinks, biases everywhere, the clamped GLU) at the tests'
    shapes: 2 steps with ERC, on megatron's unfused attention, named in the banner; the sinks learn."""
    run = tmp_path / "run"
    proc = train(run, tiny_corpus, "training.train_iters=2", "model.kv_channels=32", "model.window_size=[7,0]",
                 config=REPO / "configs" / "tiny-gpt-oss.yaml")
    assert "attention megatron unfused" in proc.stdout
    rows = records(run)
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["lm_loss"]) for r in rows)
    assert len(rows[-1]["erc_loss_per_layer"]) == 2 and all(v >= 0 for v in rows[-1]["erc_loss_per_layer"])
