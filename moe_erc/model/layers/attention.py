"""Core attention through PyTorch's ``scaled_dot_product_attention`` (flash / cuDNN / memory-efficient kernels).

megatron-core's local spec computes attention as ``softmax(Q K^T) V`` with the ``[b, heads, s, s]`` score
matrix materialised (and its fused softmax needs apex's kernels); at sequence 4096 that ran a GPU out of
memory. :class:`SDPAttention` keeps megatron's ``DotProductAttention`` interface and configuration (heads
per TP rank, softmax scale, dropout under the RNG tracker) and hands the work to SDPA, which picks a
flash or memory-efficient kernel on GPU and a fused CPU kernel otherwise. It is swapped into the local
spec by :mod:`moe_erc.model.layers.spec` whenever transformer-engine is absent.

Shapes: query ``[sq, b, np, hn]``, key/value ``[sk, b, ng, hn]`` -> context ``[sq, b, np * hn]``; with multi-latent
attention (megatron's local spec has no core attention for it: its ``DotProductAttention`` takes one head size)
query/key ``[s, b, np, qk_head_dim + qk_pos_emb_head_dim]``, value ``[s, b, np, v_head_dim]`` -> ``[s, b, np * v_head_dim]``.
"""

from __future__ import annotations

import torch.nn.functional as F

from moe_erc.compat import import_megatron

import_megatron()
from megatron.core import tensor_parallel  # noqa: E402
from megatron.core.transformer.dot_product_attention import DotProductAttention  # noqa: E402
from megatron.core.transformer.enums import AttnMaskType  # noqa: E402


class SDPAttention(DotProductAttention):
    """megatron's ``DotProductAttention`` with the score/softmax/context part done by one SDPA call."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, k_channels=None, v_channels=None, **kwargs):
        super().__init__(config, layer_number, attn_mask_type, attention_type,
                         attention_dropout=attention_dropout, softmax_scale=softmax_scale, **kwargs)
        if v_channels is not None:  # multi-latent attention: Q/K heads of k_channels, V heads of v_channels
            heads = self.num_attention_heads_per_partition
            self.hidden_size_per_partition = v_channels * heads
            if softmax_scale is None:
                self.softmax_scale = 1.0 / (k_channels or v_channels) ** 0.5
        if self.softmax_offset is not None or config.window_size is not None:
            raise ValueError("SDPA attention supports the vanilla softmax without a sliding window; "
                             "set model.attention_backend=local to use megatron's attention")
        # megatron divides the scale by the layer number and multiplies it back inside its softmax.
        self.sdpa_scale = self.softmax_scale * (self.layer_number if config.apply_query_key_layer_scaling else 1)
        self.dropout_p = self.attention_dropout.p

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPA attention does not take packed sequences or an attention bias")
        mask_type = attn_mask_type or self.attn_mask_type
        causal = attention_mask is None and mask_type == AttnMaskType.causal
        # megatron's masks are True where attention is *not* allowed; SDPA's boolean masks the opposite.
        sdpa_mask = None if attention_mask is None else ~attention_mask
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, hn]
        dropout = self.dropout_p if self.training else 0.0
        gqa = q.shape[1] != k.shape[1]
        if dropout and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():  # as megatron: a TP-rank-specific stream
                context = self._sdpa(q, k, v, sdpa_mask, dropout, causal, gqa)
        else:
            context = self._sdpa(q, k, v, sdpa_mask, dropout, causal, gqa)
        sq, b = query.shape[0], query.shape[1]
        return context.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)

    def _sdpa(self, q, k, v, mask, dropout, causal, gqa):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal,
                                              scale=self.sdpa_scale, enable_gqa=gqa)
