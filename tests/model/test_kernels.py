"""Optional fused kernels are switched on only where what they need imports (moe_erc/model/layers/kernels.py).

A CPU machine cannot load the kernels, but it can check the decisions: a GPU is simulated by making
``torch.cuda.is_available`` true and answering the import probes from a list.
"""

import dataclasses

import pytest
import torch

from moe_erc.model.layers import kernels
from moe_erc.config import load_config

ALL_OFF = kernels.Kernels()


def _simulated_gpu(monkeypatch, importable: set[str]):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(kernels, "runtime_device", lambda: "cuda")
    monkeypatch.setattr(kernels, "_imports", lambda module: module in importable)
    monkeypatch.setattr(kernels, "_have_te_permute", lambda: "te-permute" in importable)
    monkeypatch.delenv("TORCH_COMPILE_DISABLE", raising=False)


def test_everything_is_off_on_cpu():
    assert kernels.detect("cpu") == ALL_OFF
    assert "kernels on: none" in ALL_OFF.summary() and ALL_OFF.optimizer() == "torch AdamW"


def test_plain_cuda_torch_without_triton_apex_or_te_gets_no_fused_kernel(monkeypatch):
    """The first GPU run failed on masked_softmax_fusion=True without its extension: it must be off."""
    _simulated_gpu(monkeypatch, set())
    assert kernels.detect("cuda") == ALL_OFF


def test_triton_enables_megatrons_torch_compile_fusions_only(monkeypatch):
    _simulated_gpu(monkeypatch, {"triton"})
    found = kernels.detect("cuda")
    on = {f.name for f in dataclasses.fields(found) if getattr(found, f.name)}
    assert on == {"bias_activation", "bias_dropout", "cross_entropy"}
    monkeypatch.setenv("TORCH_COMPILE_DISABLE", "1")  # torch.compile disabled: nothing would be fused
    assert kernels.detect("cuda") == ALL_OFF


def test_each_extension_turns_on_its_own_switch(monkeypatch):
    _simulated_gpu(monkeypatch, set(kernels._SOFTMAX_EXTENSIONS) | {"fused_weight_gradient_mlp_cuda",
                                                                     "apex.optimizers"})
    found = kernels.detect("cuda")
    assert found.masked_softmax and found.grad_accumulation and found.apex
    assert not (found.rope or found.permute or found.transformer_engine)
    assert found.optimizer() == "apex FusedAdam"
    _simulated_gpu(monkeypatch, set(kernels._SOFTMAX_EXTENSIONS[:2]))  # one extension missing: off
    assert not kernels.detect("cuda").masked_softmax


def test_transformer_engine_brings_rope_and_permute_fusion(monkeypatch):
    _simulated_gpu(monkeypatch, {"transformer_engine.pytorch", "te-permute"})
    found = kernels.detect("cuda")
    assert found.transformer_engine and found.rope and found.permute
    assert found.optimizer() == "TE FusedAdam"


def test_fused_kernels_false_turns_every_switch_off(monkeypatch):
    _simulated_gpu(monkeypatch, {"triton", "transformer_engine.pytorch", *kernels._SOFTMAX_EXTENSIONS})
    found = kernels.detect("cuda", enabled=False)
    assert found == kernels.Kernels(transformer_engine=True)


@pytest.mark.parametrize("flag, switch", [
    ("masked_softmax", "masked_softmax_fusion"),  # (rope: megatron itself refuses it without TE)
    ("bias_activation", "bias_activation_fusion"), ("bias_dropout", "bias_dropout_fusion"),
    ("cross_entropy", "cross_entropy_loss_fusion"), ("grad_accumulation", "gradient_accumulation_fusion"),
])
def test_transformer_config_follows_the_detected_kernels(flag, switch):
    from moe_erc.model import gpt as model_lib

    cfg = load_config(None, [])
    off = model_lib.transformer_config(cfg, "fp32", ALL_OFF)
    on = model_lib.transformer_config(cfg, "fp32", dataclasses.replace(ALL_OFF, **{flag: True}))
    assert getattr(off, switch) is False and getattr(on, switch) is True
    assert model_lib.transformer_config(cfg).masked_softmax_fusion is False  # this CPU machine: detected off
