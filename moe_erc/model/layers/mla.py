"""Multi-latent attention on megatron-core's local spec, for DeepSeek-V2-Lite / Moonlight's uncompressed Q.

megatron's ``MLASelfAttention`` with ``qk_layernorm`` and no ``q_lora_rank`` asks for a fused norm+linear as the Q
projection (a second norm of the already normalised layer input, which only transformer-engine provides). The
models with that shape have no Q norm at all: Q is one plain projection of the layer input, and only the KV latent
is normalised. :class:`LocalMLASelfAttention` builds exactly that, and otherwise is megatron's class unchanged.
Swapped in by :mod:`moe_erc.model.layers.spec` on the local spec only.
"""

from __future__ import annotations

from moe_erc.compat import import_megatron

import_megatron()
from megatron.core.tensor_parallel import ColumnParallelLinear  # noqa: E402
from megatron.core.transformer.identity_op import IdentityOp  # noqa: E402
from megatron.core.transformer.multi_latent_attention import MLASelfAttention  # noqa: E402


class LocalMLASelfAttention(MLASelfAttention):
    """MLA whose uncompressed Q (``q_lora_rank`` null) is a plain column-parallel projection with no norm."""

    def _resolve_qk_norm_config(self, submodules):
        if self.config.q_lora_rank is not None or not self.config.qk_layernorm:
            return super()._resolve_qk_norm_config(submodules)
        return dict(linear_q_proj=submodules.linear_q_proj or ColumnParallelLinear, linear_q_up_proj=IdentityOp,
                    linear_kv_up_proj=submodules.linear_kv_up_proj or ColumnParallelLinear, q_layernorm=IdentityOp,
                    kv_layernorm=submodules.kv_layernorm)
