"""Trainer pieces a GPU run depends on, checked on CPU: batch placement, pinned loading, bf16 parameters.

The first GPU run failed at step 1 because batches stayed on the CPU. The meta device stands in for the
GPU here: a tensor that reaches the model on "meta" was moved by the trainer, not created there.
"""

import pytest
import torch

from moe_erc.training import trainer as trainer_module
from moe_erc.data.datasets import move_batch

META = torch.device("meta")


def _batch():
    tokens = torch.arange(12).view(2, 6)
    return {"tokens": tokens, "labels": tokens + 1, "loss_mask": torch.ones(2, 6),
            "position_ids": torch.arange(6).repeat(2, 1), "note": "not a tensor"}


def test_move_batch_puts_every_tensor_on_the_device():
    moved = move_batch(_batch(), META)
    assert {k: v.device.type for k, v in moved.items() if torch.is_tensor(v)} == dict.fromkeys(
        ["tokens", "labels", "loss_mask", "position_ids"], "meta")
    assert moved["note"] == "not a tensor"


class _Monitor:
    def set_batch(self, step, tokens):
        self.tokens_device = tokens.device


class _Model(torch.nn.Module):
    def forward(self, tokens, position_ids, attention_mask, labels):
        self.devices = {"tokens": tokens.device, "position_ids": position_ids.device, "labels": labels.device}
        return torch.zeros(tokens.shape, device=tokens.device)


def test_the_forward_step_feeds_the_model_on_the_compute_device():
    trainer = trainer_module.Trainer.__new__(trainer_module.Trainer)  # only what _forward_step reads
    trainer.compute_device, trainer.step, trainer._nan_test_step = META, 0, -1
    trainer.monitor, model = _Monitor(), _Model()
    output, loss_func = trainer._forward_step(iter([_batch()]), model)
    assert set(model.devices.values()) == {META} and output.device == META
    assert trainer.monitor.tokens_device.type == "cpu"  # the routing trace reads token ids on the host
    assert loss_func.args[0].device == META  # the loss mask meets the loss on the device


@pytest.mark.parametrize("device, pinned", [(torch.device("cuda", 0), True), (torch.device("cpu"), False)])
def test_batches_are_loaded_into_pinned_memory_for_a_gpu(monkeypatch, device, pinned):
    seen = {}
    monkeypatch.setattr(trainer_module, "build_dataloader", lambda *a, **kw: seen.update(kw) or [])
    trainer = trainer_module.Trainer.__new__(trainer_module.Trainer)
    trainer.compute_device, trainer.dp = device, 1
    trainer.topo = type("Topo", (), {"dp_rank": 0})()
    trainer.cfg = trainer_module.Config()
    trainer._data_iterator(dataset=None, consumed_samples=0)
    assert seen["pin_memory"] is pinned


def test_a_bf16_model_has_every_parameter_in_bf16():
    """megatron's non-distributed mixed-precision optimizer cannot save fp32 parameters of a bf16 model
    ("Param id ... does not match any model sharded param"); torch's norms are built in fp32."""
    from moe_erc.model import gpt as model_lib
    from moe_erc.training import parallel
    from moe_erc.compat import prepare_runtime
    from moe_erc.config import load_config

    cfg = load_config(None, ["model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=2",
                             "moe.num_experts=4", "erc.enabled=true"])
    parallel.initialize(cfg, prepare_runtime("cpu"))
    try:
        net = model_lib.build_model(cfg, model_lib.transformer_config(cfg, "bf16"), vocab_size=64)
        dtypes = {name: p.dtype for name, p in net.named_parameters()}
    finally:
        parallel.destroy()
    assert "decoder.final_layernorm.weight" in dtypes and "decoder.layers.0.mlp.router.weight" in dtypes
    assert set(dtypes.values()) == {torch.bfloat16}, {n: d for n, d in dtypes.items() if d != torch.bfloat16}


def test_training_compile_compiles_every_transformer_layer_in_place():
    from moe_erc.model import gpt as model_lib
    from moe_erc.training import parallel
    from moe_erc.compat import prepare_runtime
    from moe_erc.config import load_config

    cfg = load_config(None, ["model.num_layers=3", "model.hidden_size=32", "model.num_attention_heads=2",
                             "moe.num_experts=4", "training.compile=true"])
    parallel.initialize(cfg, prepare_runtime("cpu"))
    try:
        net = model_lib.build_model(cfg, model_lib.transformer_config(cfg), vocab_size=64)
        assert all(layer._compiled_call_impl is None for layer in net.decoder.layers)
        assert model_lib.compile_layers(net) == 3
        assert all(layer._compiled_call_impl is not None for layer in net.decoder.layers)
    finally:
        parallel.destroy()
