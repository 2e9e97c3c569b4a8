"""The CPU compatibility layer: every patch target still exists, patches take effect, nothing else changes."""

import pytest
import torch

from moe_erc.compat import cpu, import_megatron, prepare_runtime

import_megatron()


@pytest.fixture(scope="module", autouse=True)
def applied():
    assert prepare_runtime("cpu") == "cpu"


def test_every_listed_module_sees_the_cpu_view_of_torch():
    import importlib

    for name in cpu.MODULES_SEEING_CPU_TORCH:
        assert importlib.import_module(name).torch is cpu.TORCH_ON_CPU, name


def test_every_function_patch_is_installed():
    import importlib

    for patch in cpu.FUNCTION_PATCHES:
        owner, attr = cpu._resolve(importlib.import_module(patch.module), patch.attribute)
        value = owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr)
        value = value.__func__ if isinstance(value, staticmethod) else value
        assert getattr(value, "_moe_erc_patch", False), f"{patch.module}.{patch.attribute}"


def test_torch_itself_is_untouched():
    assert torch.cuda.current_device is not cpu.TORCH_ON_CPU.cuda.current_device
    assert torch.tensor is not cpu.TORCH_ON_CPU.tensor
    with pytest.raises((AssertionError, RuntimeError)):
        torch.zeros(1, device="cuda")


def test_cpu_view_maps_cuda_requests_to_the_cpu():
    view = cpu.TORCH_ON_CPU
    assert view.zeros(2, device="cuda").device.type == "cpu"
    assert view.tensor([1.0], device=torch.device("cuda")).device.type == "cpu"
    assert view.empty(3, device=view.cuda.current_device()).device.type == "cpu"
    stream = view.cuda.Stream()
    stream.wait_stream(view.cuda.current_stream())
    with view.cuda.stream(stream):
        pass
    assert stream == view.cuda.current_stream()
    assert view.Tensor is torch.Tensor and view.float32 is torch.float32


def test_rng_tracker_forks_are_reproducible_on_cpu():
    """megatron's tracker keeps its named "CUDA" streams in the CPU generator: forking twice from the
    same seed draws the same numbers, and the default stream is restored afterwards."""
    from megatron.core.tensor_parallel import random as mrandom

    tracker = mrandom.get_cuda_rng_tracker()
    tracker.reset()
    tracker.add("test-rng", 42)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    with tracker.fork("test-rng"):
        first = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before)
    tracker.reset()
    tracker.add("test-rng", 42)
    with tracker.fork("test-rng"):
        second = torch.rand(4)
    assert torch.equal(first, second)
    tracker.reset()


def test_alltoall_split_sizes_become_host_arrays():
    from megatron.core.transformer.moe import token_dispatcher

    splits = token_dispatcher.maybe_move_tensor_to_cpu(torch.tensor([3, 5]), as_numpy=True)
    assert list(splits) == [3, 5] and not torch.is_tensor(splits)
    counts = torch.tensor([1, 2])
    assert token_dispatcher.maybe_move_tensor_to_cpu(counts) is counts


def test_grad_clipping_scales_cpu_grads():
    from megatron.core.optimizer import optimizer as mopt

    params = [torch.nn.Parameter(torch.ones(3)) for _ in range(2)]
    for p in params:
        p.grad = torch.full((3,), 2.0)
    total_norm = float(torch.cat([p.grad for p in params]).norm())
    mopt.clip_grad_by_total_norm_fp32(params, max_norm=1.0, total_norm=total_norm)
    clipped = float(torch.cat([p.grad for p in params]).norm())
    assert clipped == pytest.approx(1.0, rel=1e-5)


def test_torch_norm_accepts_sequence_parallel_and_marks_its_params():
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2, normalization="RMSNorm",
                               tensor_model_parallel_size=1, sequence_parallel=False)
    config.sequence_parallel = True  # as with TP > 1 (TransformerConfig would reject it at TP=1)
    norm = WrappedTorchNorm(config, 8)
    assert isinstance(norm, torch.nn.RMSNorm) and config.sequence_parallel is True
    assert all(getattr(p, "sequence_parallel", False) for p in norm.parameters())
    config.sequence_parallel = False
    plain = WrappedTorchNorm(config, 8)
    assert not any(getattr(p, "sequence_parallel", False) for p in plain.parameters())


def test_a_renamed_upstream_symbol_fails_loudly(monkeypatch):
    monkeypatch.setattr(cpu, "_APPLIED", False)
    monkeypatch.setattr(cpu, "FUNCTION_PATCHES", [cpu.FunctionPatch(
        "megatron.core.optimizer.clip_grads", "no_such_function", lambda original: original, "test")])
    with pytest.raises(cpu.CompatError, match="no_such_function is gone"):
        cpu.apply()
    monkeypatch.setattr(cpu, "FUNCTION_PATCHES", [])
    monkeypatch.setattr(cpu, "MODULES_SEEING_CPU_TORCH", {"megatron.core.no_such_module": "test"})
    with pytest.raises(cpu.CompatError, match="no_such_module is gone"):
        cpu.apply()


def test_paged_stash_stand_in_only_replaces_that_module():
    import importlib.util
    import sys

    if importlib.util.find_spec("triton") is not None:
        pytest.skip("triton is installed: the real module is used")
    stub = sys.modules["megatron.core.transformer.moe.ops.paged_stash"]
    with pytest.raises(RuntimeError, match="needs triton"):
        stub.paged_stash_copy_kernel()
    assert "triton" not in sys.modules
