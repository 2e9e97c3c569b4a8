"""The model: megatron-core's GPTModel with moe-erc's MoE layers, and the math that defines them.

* :mod:`.gpt`          moe-erc config -> megatron ``TransformerConfig`` + ``GPTModel`` (parameters in the compute dtype)
* :mod:`.layers`       what a step runs on the device that moe-erc owns: the layer spec, attention, routers (ERC,
                       K-Means, AoE), the token dispatcher, grouped-GEMM experts, optional kernels
* :mod:`.erc`          the ERC loss as pure functions (noise bounds, proxies, ``M``, hinge), O(n^2) memory
* :mod:`.flops`        analytic FLOPs per step and ERC's share
* :mod:`.hf_mapping`   megatron <-> transformers weight names, one table for ``import`` and ``export``

Imports point down from here (``moe_erc.config``, ``moe_erc.compat``, ``moe_erc.errors``), never up to
:mod:`moe_erc.training` or :mod:`moe_erc.commands`.
"""
