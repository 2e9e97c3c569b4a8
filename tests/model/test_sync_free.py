"""moe_erc.model.layers.sync_free: the device-only replacements compute what megatron's fallbacks compute."""

import math

import pytest
import torch

from moe_erc.compat import prepare_runtime

prepare_runtime("cpu")
from megatron.core import utils as megatron_utils  # noqa: E402

from moe_erc.model.layers import sync_free  # noqa: E402
from moe_erc.commands import budget  # noqa: E402

NOOP = torch.zeros(1, dtype=torch.int)


def _grads(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(7, 5, generator=g), torch.randn(3, generator=g) * 10, torch.randn(2, 2, 2, generator=g)]


def test_foreach_l2_norm_equals_megatrons_and_reads_nothing():
    grads = _grads()
    ours, _ = sync_free.foreach_l2_norm(2048 * 32, NOOP, [grads], False)
    theirs, _ = megatron_utils.local_multi_tensor_l2_norm(2048 * 32, NOOP, [grads], False)
    flat = torch.cat([g.reshape(-1) for g in grads])
    assert ours.shape == (1,) and torch.allclose(ours, theirs, rtol=1e-6)
    assert math.isclose(ours.item(), flat.double().norm().item(), rel_tol=1e-6)
    assert not budget.count_calls(sync_free.foreach_l2_norm, 2048 * 32, NOOP, [grads], False).reads
    # megatron's own fallback reads every per-tensor norm: what the replacement removes
    assert budget.count_calls(megatron_utils.local_multi_tensor_l2_norm, 2048 * 32, NOOP, [grads], False).reads


@pytest.mark.parametrize("scale", [0.5, torch.tensor([0.25])])
def test_foreach_scale_in_place_and_into_other_tensors(scale):
    src = _grads(1)
    expected = [s * (scale if isinstance(scale, float) else scale.item()) for s in src]
    dst = [torch.empty_like(s) for s in src]
    sync_free.foreach_scale(0, NOOP, [src, dst], scale)
    assert all(torch.equal(d, e) for d, e in zip(dst, expected))
    sync_free.foreach_scale(0, NOOP, [src, src], scale)  # clipping: in place
    assert all(torch.equal(s, e) for s, e in zip(src, expected))
    half = [torch.empty_like(s, dtype=torch.bfloat16) for s in src]  # main -> bf16 model params
    sync_free.foreach_scale(0, NOOP, [src, half], 1.0)
    assert all(torch.equal(h, s.bfloat16()) for h, s in zip(half, src))


def test_cross_entropy_predicted_logits_equal_megatrons_with_targets_outside_the_shard():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 2, 8, generator=g)
    target = torch.randint(0, 16, (5, 2), generator=g)  # half of them in another TP rank's vocab shard
    target[0, 0], target[1, 1] = 7, 8  # both edges of the shard [0, 8)
    logits_max = logits.max(dim=-1)[0]
    original = sync_free.MEGATRON_PREDICTED_LOGITS
    assert original is not sync_free.predicted_logits_masked_fill
    ours = sync_free.predicted_logits_masked_fill(logits.clone(), target, logits_max, 0, 8)
    theirs = original(logits.clone(), target, logits_max, 0, 8)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
    count = budget.count_calls(sync_free.predicted_logits_masked_fill, logits.clone(), target, logits_max, 0, 8)
    assert not count.reads
    assert budget.count_calls(original, logits.clone(), target, logits_max, 0, 8).reads  # megatron's: index_put_


class _Stub:
    def __init__(self, norm):
        self.norm = norm

    def get_grad_norm(self):
        return self.norm


def test_chained_grad_norm_combines_on_the_device():
    chained = type("Chained", (), {"grads_states_parallel_group_is_shared": lambda self: False})()
    chained.chained_optimizers = [_Stub(torch.tensor([3.0])), _Stub(torch.tensor(4.0))]
    norm = budget.count_calls(sync_free.chained_grad_norm, chained)
    assert not norm.reads
    assert sync_free.chained_grad_norm(chained).item() == pytest.approx(5.0)
    chained.chained_optimizers = [_Stub(3.0), _Stub(None), _Stub(4.0)]  # host floats: megatron's arithmetic
    assert sync_free.chained_grad_norm(chained) == pytest.approx(5.0)
