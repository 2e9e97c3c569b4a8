"""What a training step runs on the device that moe-erc owns, in one place.

megatron-core builds the model from a layer spec; :mod:`.spec` swaps moe-erc's modules into it:

| module | what runs on the device |
|---|---|
| :mod:`.spec` | which module runs each part of a layer (the one plug-in point) |
| :mod:`.attention` | SDPA core attention (flash / memory-efficient kernels) |
| :mod:`.routers` | routers: top-K + ERC (:mod:`.erc_layer`), K-Means, Autonomy-of-Experts |
| :mod:`.erc_layer` | the ERC loss inside megatron's MoE layer, distributed over TP/EP |
| :mod:`.dispatch` | the token dispatcher: device-side token counts, no host sync at EP = TP = 1 |
| :mod:`.experts` | grouped-GEMM experts on ``torch._grouped_mm`` |
| :mod:`.kernels` | which optional fused kernels (transformer-engine, apex, triton) this machine can run |
| :mod:`.sync_free` | gradient norm, clipping and cross-entropy without host reads when apex/TE are absent |

The ERC math itself (pure functions, shapes in the docstrings) is :mod:`moe_erc.model.erc`. Imports point down
from here to ``moe_erc.model.erc``, ``moe_erc.config`` and ``moe_erc.compat``, never up to the trainer.
"""
