"""GroupedExperts (torch._grouped_mm) is a drop-in for megatron's SequentialMLP: same initial weights,
same outputs and gradients, same losses in training, checkpoints that move between the two."""

import pytest
import torch

from launch import losses, train


# megatron's SwiGLU, and gpt-oss's GLU: x * sigmoid(1.702 x) of the gate clamped above, (linear part clamped + 1);
# a clamp of 0.05, below the pre-activations' spread here (std ~0.1), so both sides are cut.
ACTIVATIONS = {"swiglu": [], "clamped-quick-gelu": ["model.activation=quick_gelu", "model.activation_func_clamp_value=0.05",
                                                    "model.glu_linear_offset=1.0"]}


@pytest.fixture(scope="module", params=list(ACTIVATIONS))
def two_layers(request):
    """One MoE layer built with SequentialMLP and one with GroupedExperts from the same seed."""
    from moe_erc.model import gpt as model_lib
    from moe_erc.training import parallel
    from moe_erc.compat import prepare_runtime
    from moe_erc.config import load_config
    from moe_erc.model.layers.experts import GroupedExperts

    overrides = ["model.num_layers=1", "model.hidden_size=32", "model.num_attention_heads=2",
                 "moe.num_experts=4", "moe.moe_ffn_hidden_size=24", "model.seq_length=8", *ACTIVATIONS[request.param]]
    built = []
    parallel.initialize(load_config(None, overrides), prepare_runtime("cpu"))  # same layout for both
    for grouped in (False, True):
        cfg = load_config(None, [*overrides, f"moe.moe_grouped_gemm={str(grouped).lower()}"])
        parallel.set_seed(cfg.training.seed)
        net = model_lib.build_model(cfg, model_lib.transformer_config(cfg), vocab_size=64)
        built.append(net.decoder.layers[0].mlp.experts)
    sequential, grouped = built
    assert isinstance(grouped, GroupedExperts) and not isinstance(sequential, GroupedExperts)
    yield sequential, grouped
    parallel.destroy()


def test_the_same_seed_gives_the_same_expert_weights(two_layers):
    sequential, grouped = two_layers
    for e, expert in enumerate(sequential.local_experts):
        assert torch.equal(grouped.weight1[e], expert.linear_fc1.weight)
        assert torch.equal(grouped.weight2[e], expert.linear_fc2.weight)


@pytest.mark.parametrize("counts", [[3, 0, 5, 2], [0, 0, 0, 7], [1, 1, 1, 1]])
def test_outputs_and_gradients_match_the_per_expert_loop(two_layers, counts):
    sequential, grouped = two_layers
    tokens = torch.randn(sum(counts), 32)
    probs = torch.rand(sum(counts))
    x1, x2 = tokens.clone().requires_grad_(), tokens.clone().requires_grad_()
    out1, _ = sequential(x1, torch.tensor(counts), probs)
    out2, _ = grouped(x2, torch.tensor(counts), probs)
    torch.testing.assert_close(out2, out1, rtol=1e-5, atol=1e-6)
    upstream = torch.randn_like(out1)
    out1.backward(upstream)
    out2.backward(upstream)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-5, atol=1e-6)
    for e, expert in enumerate(sequential.local_experts):
        torch.testing.assert_close(grouped.weight1.grad[e], expert.linear_fc1.weight.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grouped.weight2.grad[e], expert.linear_fc2.weight.grad, rtol=1e-5, atol=1e-6)
    for p in (*sequential.parameters(), *grouped.parameters()):
        p.grad = None


def test_the_gate_view_is_what_erc_reads_without_a_copy(two_layers):
    from moe_erc.model.layers.erc_layer import gate_weights

    sequential, grouped = two_layers
    stacked = gate_weights(grouped, gated=True)
    assert stacked.shape == (4, 24, 32) and stacked.data_ptr() == grouped.weight1.data_ptr()
    for e, w in enumerate(gate_weights(sequential, gated=True)):
        assert torch.equal(stacked[e], w)


@pytest.fixture(scope="module")
def sequential_run(tiny_corpus, tmp_path_factory):
    """4 steps with SequentialMLP and ERC on: the run the GroupedExperts runs are compared with."""
    run = tmp_path_factory.mktemp("sequential") / "run"
    train(run, tiny_corpus, "training.train_iters=4", "erc.enabled=true", "moe.moe_grouped_gemm=false")
    return run


def test_training_logs_the_same_losses_with_either_expert_module(sequential_run, tiny_corpus, tmp_path):
    """ERC on, so the ERC loss's read of the strided gate view is part of what must agree."""
    train(tmp_path / "grouped", tiny_corpus, "training.train_iters=4", "erc.enabled=true",
          "moe.moe_grouped_gemm=true")
    one, two = losses(sequential_run), losses(tmp_path / "grouped")
    for step in (1, 2, 3, 4):
        assert two[step] == pytest.approx(one[step], rel=1e-5), (one, two)


@pytest.mark.parametrize("first, then", [("false", "true"), ("true", "false")])
def test_checkpoints_with_optimizer_state_move_between_the_modules(sequential_run, tiny_corpus, tmp_path,
                                                                   first, then):
    """Saved with one expert module after 2 steps, resumed with the other: steps 3-4 continue like the
    uninterrupted run (weights and Adam state mapped expert by expert)."""
    moved = tmp_path / "moved"
    common = ["training.train_iters=4", "erc.enabled=true"]
    train(moved, tiny_corpus, *common, "training.exit_interval=2", f"moe.moe_grouped_gemm={first}")
    train(moved, tiny_corpus, *common, f"moe.moe_grouped_gemm={then}")
    for step in (3, 4):
        assert losses(moved)[step] == pytest.approx(losses(sequential_run)[step], rel=1e-5)


def test_expert_tensor_parallel_grouped_experts_match_one_process_and_save(sequential_run, tiny_corpus, tmp_path):
    """TP=2 (expert-TP 2: D split over two ranks) loads the one-process SequentialMLP checkpoint, logs its
    losses, and writes a checkpoint of its own (one writer per expert-TP shard)."""
    common = ["training.train_iters=2", "training.resume=none", "erc.enabled=true",
              f"checkpoint.load={sequential_run / 'checkpoints'}"]
    single, double = tmp_path / "single", tmp_path / "double"
    train(single, tiny_corpus, *common, "moe.moe_grouped_gemm=false")
    train(double, tiny_corpus, *common, "moe.moe_grouped_gemm=true", "parallel.tensor_model_parallel_size=2", nproc=2)
    one, two = losses(single), losses(double)
    for step in (1, 2):
        assert two[step] == pytest.approx(one[step], rel=2e-5), (one, two)
    assert (double / "checkpoints" / "step_0000002" / "metadata.json").is_file()


def test_an_unaligned_width_takes_the_loop_and_warns_once():
    """Rows that are not 16-byte aligned cannot use the grouped kernel: same result, one warning per shape."""
    import warnings

    from moe_erc.compat import prepare_runtime

    prepare_runtime("cpu")
    from moe_erc.model.layers import experts

    g = torch.Generator().manual_seed(0)
    tokens, weights = torch.randn(7, 5, generator=g), torch.randn(3, 6, 5, generator=g)  # k=5: 20-byte rows
    offsets = torch.tensor([2, 2, 7], dtype=torch.int32)
    expected = torch.cat([tokens[:2] @ weights[0].t(), tokens[2:2] @ weights[1].t(), tokens[2:] @ weights[2].t()])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            assert torch.allclose(experts.grouped_mm(tokens, weights, offsets), expected, atol=1e-6)
    assert len([w for w in caught if "not 16-byte aligned" in str(w.message)]) == 1
