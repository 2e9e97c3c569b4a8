"""SDPA core attention equals megatron's DotProductAttention, without materialising the [s, s] scores."""

import pytest
import torch

from launch import losses, train


@pytest.fixture(scope="module")
def attention_pair():
    """(SDPAttention, megatron's DotProductAttention) built by the model from one config: 4 heads, 2 groups."""
    from moe_erc.model import gpt as model_lib
    from moe_erc.training import parallel
    from moe_erc.model.layers.attention import SDPAttention
    from moe_erc.compat import prepare_runtime
    from moe_erc.config import load_config

    from megatron.core.transformer.dot_product_attention import DotProductAttention  # after moe_erc (compat)

    cfg = load_config(None, ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
                             "model.num_query_groups=2", "moe.num_experts=4"])
    parallel.initialize(cfg, prepare_runtime("cpu"))
    net = model_lib.build_model(cfg, model_lib.transformer_config(cfg), vocab_size=64)
    sdpa = net.decoder.layers[1].self_attention.core_attention
    assert isinstance(sdpa, SDPAttention)
    yield sdpa, lambda *args: DotProductAttention.forward(sdpa, *args)
    parallel.destroy()


def _qkv(s=12, b=3, heads=4, groups=2, hn=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(s, b, heads, hn, generator=g), torch.randn(s, b, groups, hn, generator=g),
            torch.randn(s, b, groups, hn, generator=g))


def test_causal_attention_with_grouped_queries_matches_megatron(attention_pair):
    sdpa, megatron = attention_pair
    q, k, v = (t.requires_grad_() for t in _qkv())
    out = sdpa(q, k, v, None)
    assert out.shape == (12, 3, 64)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref = megatron(q2, k2, v2, None)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for mine, theirs in zip(grads, torch.autograd.grad(ref.square().sum(), (q2, k2, v2))):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)


def test_an_explicit_mask_means_the_same_as_in_megatron(attention_pair):
    """megatron masks are True where attention is forbidden; here a causal mask plus a padded first key."""
    sdpa, megatron = attention_pair
    q, k, v = _qkv(seed=1)
    mask = torch.ones(12, 12, dtype=torch.bool).triu(1)
    mask[:, 0] = True
    mask[0, 0] = False  # every query keeps at least one key
    mask = mask.view(1, 1, 12, 12).expand(3, 1, 12, 12)
    torch.testing.assert_close(sdpa(q, k, v, mask), megatron(q, k, v, mask), rtol=1e-5, atol=1e-6)


def _largest_allocation(fn) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max((e.cpu_memory_usage for e in prof.events()), default=0)


def test_long_sequences_do_not_materialise_the_score_matrix(attention_pair):
    sdpa, megatron = attention_pair
    q, k, v = _qkv(s=2048, b=1, seed=2)
    scores = 1 * 4 * 2048 * 2048 * 4  # [b, heads, s, s] fp32 = 64 MiB
    with torch.no_grad():
        assert _largest_allocation(lambda: megatron(q, k, v, None)) >= scores  # the instrument sees it
        assert _largest_allocation(lambda: sdpa(q, k, v, None)) < scores / 8


def test_training_logs_the_same_losses_with_sdpa_and_megatrons_attention(tiny_corpus, tmp_path):
    for backend in ("local", "sdpa"):
        train(tmp_path / backend, tiny_corpus, "training.train_iters=3", f"model.attention_backend={backend}")
    one, two = losses(tmp_path / "local"), losses(tmp_path / "sdpa")
    for step in (1, 2, 3):
        assert two[step] == pytest.approx(one[step], rel=1e-5), (one, two)
