"""megatron GPTModel <-> transformers weight names: one table that ``moe-erc export`` reads one way and
``moe-erc import`` the other (docs/export.md, docs/import.md).

Most tensors are renamed one to one (:func:`renames`); four are fused in megatron and split in transformers:

* QKV: megatron's ``linear_qkv`` holds, per query group, ``[q heads of the group; k; v]`` (``head_dim`` rows
  each); transformers has ``q_proj`` / ``k_proj`` / ``v_proj``.
* a dense MLP's (and a shared expert's) ``linear_fc1`` is ``[gate; up]``: ``gate_proj`` and ``up_proj``.
* QKV biases (Qwen2-MoE) are fused like the weights: ``linear_qkv.bias`` per query group ``[q; k; v]``.
* multi-latent attention (DeepSeek-V3): the projections are renamed; megatron rotates DeepSeek's interleaved RoPE
  pairs, so only a checkpoint saved with ``rope_interleave: false`` has its RoPE rows reordered (:func:`mla_rope_rows`).
* routed experts: transformers' MoE classes stack them (``experts.gate_up_proj [n, 2D, d]``, ``experts.down_proj
  [n, d, D]``, gate rows first as in megatron); megatron holds them stacked (``GroupedExperts``), one module per
  expert (``SequentialMLP``) or as transformer-engine's ``weight0 .. weight{n-1}``. gpt-oss stores them transposed
  (``gate_up_proj [n, d, 2D]``, ``down_proj [n, D, d]``) with gate and up *interleaved* (columns 0, 2, ... gate;
  1, 3, ... up) and biases beside them (``gate_up_proj_bias``, ``down_proj_bias``; megatron's ``bias1`` / ``bias2``).
* gpt-oss's attention sinks (``self_attn.sinks``, a logit per head) are megatron's learnable ``softmax_offset``;
  its router (``mlp.router``) has a bias (megatron's router bias with ``add_bias_linear``).

The vocabulary rows are cut to the real vocabulary on export and zero-padded to megatron's padded size on import.
"""

from __future__ import annotations

import torch

from moe_erc.config import Config, layer_kinds
from moe_erc.errors import UserError


class MappingError(UserError):
    """A state dict lacks a tensor the mapping needs."""


def renames(cfg: Config, arch: str = "") -> list[tuple[tuple[str, ...], str]]:
    """``((megatron name, alternatives...), transformers name)`` of every tensor copied as it is.

    The alternatives are the names transformer-engine's layer spec gives the same tensor (norms fused into the
    next linear); export takes whichever the checkpoint has, import writes the first (the local spec's).
    """
    table = [(("decoder.final_layernorm.weight",), "model.norm.weight")]
    for i, is_moe in enumerate(layer_kinds(cfg)):
        src, dst = f"decoder.layers.{i}", f"model.layers.{i}"
        table += [
            ((f"{src}.self_attention.linear_proj.weight",), f"{dst}.self_attn.o_proj.weight"),
            ((f"{src}.input_layernorm.weight", f"{src}.self_attention.linear_qkv.layer_norm_weight"),
             f"{dst}.input_layernorm.weight"),
            ((f"{src}.pre_mlp_layernorm.weight", f"{src}.mlp.linear_fc1.layer_norm_weight"),
             f"{dst}.post_attention_layernorm.weight"),
        ]
        if cfg.model.multi_latent_attention:  # DeepSeek's names; the RoPE rows are permuted apart (mla_rope_rows)
            if cfg.model.q_lora_rank:
                table += [((f"{src}.self_attention.linear_q_down_proj.weight",), f"{dst}.self_attn.q_a_proj.weight"),
                          ((f"{src}.self_attention.q_layernorm.weight",
                            f"{src}.self_attention.linear_q_up_proj.layer_norm_weight"),
                           f"{dst}.self_attn.q_a_layernorm.weight")]
            table += [((f"{src}.self_attention.kv_layernorm.weight",
                        f"{src}.self_attention.linear_kv_up_proj.layer_norm_weight"), f"{dst}.self_attn.kv_a_layernorm.weight"),
                      ((f"{src}.self_attention.linear_kv_up_proj.weight",), f"{dst}.self_attn.kv_b_proj.weight")]
        elif cfg.model.qk_layernorm:  # RMSNorm of Q and K: per head (Qwen3-MoE) or over the projection (OLMoE)
            table += [((f"{src}.self_attention.q_layernorm.weight",), f"{dst}.self_attn.q_norm.weight"),
                      ((f"{src}.self_attention.k_layernorm.weight",), f"{dst}.self_attn.k_norm.weight")]
        if cfg.model.add_bias_linear:
            table.append(((f"{src}.self_attention.linear_proj.bias",), f"{dst}.self_attn.o_proj.bias"))
        if cfg.model.softmax_type == "learnable":  # gpt-oss's attention sinks
            table.append(((f"{src}.self_attention.core_attention.softmax_offset",), f"{dst}.self_attn.sinks"))
        if is_moe:
            router = "router" if arch == "gpt_oss" else "gate"
            table.append(((f"{src}.mlp.router.weight",), f"{dst}.mlp.{router}.weight"))
            if cfg.model.add_bias_linear:
                table.append(((f"{src}.mlp.router.bias",), f"{dst}.mlp.{router}.bias"))
            if cfg.moe.moe_router_enable_expert_bias:  # aux-loss-free balancing = GLM-4-MoE's correction bias
                table.append(((f"{src}.mlp.router.expert_bias",), f"{dst}.mlp.gate.e_score_correction_bias"))
            if cfg.moe.moe_shared_expert_intermediate_size:
                shared, gate = shared_expert_names(arch)
                table.append(((f"{src}.mlp.shared_experts.linear_fc2.weight",), f"{dst}.mlp.{shared}.down_proj.weight"))
                if cfg.moe.moe_shared_expert_gate:
                    table.append(((f"{src}.mlp.shared_experts.gate_weight",), f"{dst}.mlp.{gate}.weight"))
        else:
            table.append(((f"{src}.mlp.linear_fc2.weight",), f"{dst}.mlp.down_proj.weight"))
    return table


def _attention_shape(cfg: Config) -> tuple[int, int, int, int]:
    """(heads, query groups, head size, hidden size)."""
    m = cfg.model
    heads = m.num_attention_heads
    return heads, m.num_query_groups or heads, m.kv_channels or m.hidden_size // heads, m.hidden_size


def shared_expert_names(arch: str) -> tuple[str, str]:
    """(the shared expert's module name, its gate's) in transformers' ``arch``: Qwen2-MoE has one gated shared
    expert, GLM-4.5 and DeepSeek ``shared_experts`` without a gate."""
    return ("shared_expert", "shared_expert_gate") if arch == "qwen2_moe" else ("shared_experts", "")


def mla_rope_rows(cfg: Config, weight: torch.Tensor, kind: str) -> torch.Tensor:
    """The rows of an MLA projection with their RoPE part reordered from halves ``(x0, x2, ...; x1, x3, ...)`` to
    DeepSeek's interleaved pairs ``(x0, x1), (x2, x3), ...``, the layout megatron's MLA rotates
    (``mla_rotary_interleaved``) and transformers' ``rope_interleave: true`` reads; for checkpoints saved with
    ``rope_interleave: false``. ``kind``: ``q`` (``[heads * (qk_head_dim + rope), in]``, the last ``rope`` rows of each
    head) or ``kv`` (``[kv_lora_rank + rope, d]``, the last ``rope`` rows)."""
    m = cfg.model
    rope = m.qk_pos_emb_head_dim
    order = torch.argsort(torch.cat([torch.arange(0, rope, 2), torch.arange(1, rope, 2)]))
    if kind == "kv":
        return torch.cat([weight[: m.kv_lora_rank], weight[m.kv_lora_rank:][order]])
    heads = weight.view(m.num_attention_heads, m.qk_head_dim + rope, -1)
    return torch.cat([heads[:, : m.qk_head_dim], heads[:, m.qk_head_dim:][:, order]], dim=1).reshape(weight.shape)


def _mla_to_hf(cfg: Config, state: dict, src: str, dst: str, out: dict) -> None:
    """megatron's MLA projections as DeepSeek-V3's (``rope_interleave: true``: the same row order)."""
    q = "linear_q_up_proj" if cfg.model.q_lora_rank else "linear_q_proj"
    out[f"{dst}.self_attn.{'q_b_proj' if cfg.model.q_lora_rank else 'q_proj'}.weight"] = \
        state[f"{src}.self_attention.{q}.weight"]
    out[f"{dst}.self_attn.kv_a_proj_with_mqa.weight"] = state[f"{src}.self_attention.linear_kv_down_proj.weight"]


def _mla_from_hf(cfg: Config, hf_state: dict, src: str, dst: str, out: dict, interleaved: bool) -> None:
    q = "q_b_proj" if cfg.model.q_lora_rank else "q_proj"
    weight, kv = hf_state[f"{src}.self_attn.{q}.weight"], hf_state[f"{src}.self_attn.kv_a_proj_with_mqa.weight"]
    if not interleaved:
        weight, kv = mla_rope_rows(cfg, weight, "q"), mla_rope_rows(cfg, kv, "kv")
    out[f"{dst}.self_attention.{'linear_q_up_proj' if cfg.model.q_lora_rank else 'linear_q_proj'}.weight"] = weight
    out[f"{dst}.self_attention.linear_kv_down_proj.weight"] = kv


def _first(state: dict, names: tuple[str, ...]) -> torch.Tensor:
    for name in names:
        if name in state:
            return state[name]
    raise MappingError(f"checkpoint has none of {', '.join(names)}")


def _experts(state: dict, prefix: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[n, 2D, d]`` gate/up and ``[n, d, D]`` down of one layer, from any of megatron's expert modules."""
    if f"{prefix}.weight1" in state:  # GroupedExperts: already stacked, [gate; up] per expert
        return state[f"{prefix}.weight1"], state[f"{prefix}.weight2"]
    if f"{prefix}.local_experts.0.linear_fc1.weight" in state:  # SequentialMLP
        fc1 = [state[f"{prefix}.local_experts.{e}.linear_fc1.weight"] for e in range(n)]
        fc2 = [state[f"{prefix}.local_experts.{e}.linear_fc2.weight"] for e in range(n)]
    else:  # transformer-engine's grouped linears: weight0 .. weight{n-1}
        fc1 = [state[f"{prefix}.linear_fc1.weight{e}"] for e in range(n)]
        fc2 = [state[f"{prefix}.linear_fc2.weight{e}"] for e in range(n)]
    return torch.stack(fc1), torch.stack(fc2)


def _expert_biases(state: dict, prefix: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[n, 2D]`` gate/up and ``[n, d]`` output biases of one layer's experts (``model.add_bias_linear``)."""
    if f"{prefix}.bias1" in state:
        return state[f"{prefix}.bias1"], state[f"{prefix}.bias2"]
    if f"{prefix}.local_experts.0.linear_fc1.bias" in state:
        return (torch.stack([state[f"{prefix}.local_experts.{e}.linear_fc1.bias"] for e in range(n)]),
                torch.stack([state[f"{prefix}.local_experts.{e}.linear_fc2.bias"] for e in range(n)]))
    return (torch.stack([state[f"{prefix}.linear_fc1.bias{e}"] for e in range(n)]),
            torch.stack([state[f"{prefix}.linear_fc2.bias{e}"] for e in range(n)]))


def _interleave(gate_up: torch.Tensor, dim: int) -> torch.Tensor:
    """``[gate; up]`` halves along ``dim`` -> gpt-oss's interleaved ``gate0, up0, gate1, up1, ...``."""
    gate, up = gate_up.chunk(2, dim=dim)
    return torch.stack([gate, up], dim=dim + 1).flatten(dim, dim + 1)


def _deinterleave(gate_up: torch.Tensor, dim: int) -> torch.Tensor:
    """gpt-oss's interleaved gate/up along ``dim`` -> ``[gate; up]`` halves."""
    index = torch.arange(gate_up.shape[dim])
    return torch.cat([gate_up.index_select(dim, index[0::2]), gate_up.index_select(dim, index[1::2])], dim=dim)


def megatron_to_hf(cfg: Config, state: dict, vocab_size: int, arch: str = "") -> dict[str, torch.Tensor]:
    """megatron GPTModel state (one process, any expert module) -> transformers state (in-memory names), the
    vocabulary cut to ``vocab_size`` rows. Tensors a transformers class adds on its own (e.g. an always-built
    shared expert) are the caller's."""
    heads, groups, hd, d = _attention_shape(cfg)
    out = {hf: _first(state, names) for names, hf in renames(cfg, arch)}
    out["model.embed_tokens.weight"] = state["embedding.word_embeddings.weight"][:vocab_size]
    if cfg.model.untie_embeddings_and_output_weights:
        out["lm_head.weight"] = state["output_layer.weight"][:vocab_size]
    for i, is_moe in enumerate(layer_kinds(cfg)):
        src, dst = f"decoder.layers.{i}", f"model.layers.{i}"
        if cfg.model.multi_latent_attention:
            _mla_to_hf(cfg, state, src, dst, out)
        else:
            qkv = state[f"{src}.self_attention.linear_qkv.weight"].view(groups, heads // groups + 2, hd, d)
            out[f"{dst}.self_attn.q_proj.weight"] = qkv[:, : heads // groups].reshape(heads * hd, d)
            out[f"{dst}.self_attn.k_proj.weight"] = qkv[:, -2].reshape(groups * hd, d)
            out[f"{dst}.self_attn.v_proj.weight"] = qkv[:, -1].reshape(groups * hd, d)
        if cfg.model.add_qkv_bias or cfg.model.add_bias_linear:
            bias = state[f"{src}.self_attention.linear_qkv.bias"].view(groups, heads // groups + 2, hd)
            out[f"{dst}.self_attn.q_proj.bias"] = bias[:, : heads // groups].reshape(heads * hd)
            out[f"{dst}.self_attn.k_proj.bias"] = bias[:, -2].reshape(groups * hd)
            out[f"{dst}.self_attn.v_proj.bias"] = bias[:, -1].reshape(groups * hd)
        if is_moe:
            gate_up, down = _experts(state, f"{src}.mlp.experts", cfg.moe.num_experts)
            if arch == "gpt_oss":  # [n, d, 2D] interleaved and [n, D, d], with biases (zeros where the run has none)
                n = cfg.moe.num_experts
                bias1, bias2 = (_expert_biases(state, f"{src}.mlp.experts", n) if cfg.model.add_bias_linear
                                else (gate_up.new_zeros(n, gate_up.shape[1]), down.new_zeros(n, down.shape[1])))
                gate_up, down = _interleave(gate_up, 1).transpose(1, 2), down.transpose(1, 2)
                out[f"{dst}.mlp.experts.gate_up_proj_bias"] = _interleave(bias1, 1)
                out[f"{dst}.mlp.experts.down_proj_bias"] = bias2
            out[f"{dst}.mlp.experts.gate_up_proj"], out[f"{dst}.mlp.experts.down_proj"] = gate_up, down
            if cfg.moe.moe_shared_expert_intermediate_size:
                shared = shared_expert_names(arch)[0]
                gate, up = state[f"{src}.mlp.shared_experts.linear_fc1.weight"].chunk(2, dim=0)
                out[f"{dst}.mlp.{shared}.gate_proj.weight"], out[f"{dst}.mlp.{shared}.up_proj.weight"] = gate, up
        else:
            gate, up = state[f"{src}.mlp.linear_fc1.weight"].chunk(2, dim=0)
            out[f"{dst}.mlp.gate_proj.weight"], out[f"{dst}.mlp.up_proj.weight"] = gate, up
    return out


def hf_to_megatron(cfg: Config, hf_state: dict, padded_vocab: int, arch: str = "",
                   rope_interleaved: bool = False) -> dict[str, torch.Tensor]:
    """transformers in-memory state (``model.state_dict()``) -> megatron GPTModel state of ``cfg`` (one process,
    the local spec's names, the expert module ``moe.moe_grouped_gemm`` picks); the vocabulary zero-padded to
    ``padded_vocab`` rows; ``rope_interleaved``: an MLA checkpoint's RoPE rows are DeepSeek's pairs (else halves). The inverse
    of :func:`megatron_to_hf`."""
    heads, groups, hd, d = _attention_shape(cfg)

    def vocab(t):
        return torch.cat([t, t.new_zeros(padded_vocab - t.shape[0], t.shape[1])]) if t.shape[0] < padded_vocab else t

    out = {names[0]: hf_state[hf] for names, hf in renames(cfg, arch)}
    out["embedding.word_embeddings.weight"] = vocab(hf_state["model.embed_tokens.weight"])
    if cfg.model.untie_embeddings_and_output_weights:
        out["output_layer.weight"] = vocab(hf_state["lm_head.weight"])
    for i, is_moe in enumerate(layer_kinds(cfg)):
        src, dst = f"model.layers.{i}", f"decoder.layers.{i}"
        if cfg.model.multi_latent_attention:
            _mla_from_hf(cfg, hf_state, src, dst, out, rope_interleaved)
        else:
            q = hf_state[f"{src}.self_attn.q_proj.weight"].view(groups, heads // groups, hd, d)
            k = hf_state[f"{src}.self_attn.k_proj.weight"].view(groups, 1, hd, d)
            v = hf_state[f"{src}.self_attn.v_proj.weight"].view(groups, 1, hd, d)
            out[f"{dst}.self_attention.linear_qkv.weight"] = torch.cat([q, k, v], dim=1).reshape(-1, d)
        if cfg.model.add_qkv_bias or cfg.model.add_bias_linear:
            qb = hf_state[f"{src}.self_attn.q_proj.bias"].view(groups, heads // groups, hd)
            kb = hf_state[f"{src}.self_attn.k_proj.bias"].view(groups, 1, hd)
            vb = hf_state[f"{src}.self_attn.v_proj.bias"].view(groups, 1, hd)
            out[f"{dst}.self_attention.linear_qkv.bias"] = torch.cat([qb, kb, vb], dim=1).reshape(-1)
        if is_moe and cfg.moe.moe_shared_expert_intermediate_size:
            shared = shared_expert_names(arch)[0]
            out[f"{dst}.mlp.shared_experts.linear_fc1.weight"] = torch.cat(
                [hf_state[f"{src}.mlp.{shared}.gate_proj.weight"], hf_state[f"{src}.mlp.{shared}.up_proj.weight"]])
        if is_moe:
            gate_up, down = hf_state[f"{src}.mlp.experts.gate_up_proj"], hf_state[f"{src}.mlp.experts.down_proj"]
            if arch == "gpt_oss":  # transposed, gate/up interleaved, with biases (GroupedExperts' bias1 / bias2)
                gate_up, down = _deinterleave(gate_up, 2).transpose(1, 2), down.transpose(1, 2)
                out[f"{dst}.mlp.experts.bias1"] = _deinterleave(hf_state[f"{src}.mlp.experts.gate_up_proj_bias"], 1)
                out[f"{dst}.mlp.experts.bias2"] = hf_state[f"{src}.mlp.experts.down_proj_bias"]
            if cfg.moe.moe_grouped_gemm:
                out[f"{dst}.mlp.experts.weight1"], out[f"{dst}.mlp.experts.weight2"] = gate_up, down
            else:
                for e in range(cfg.moe.num_experts):
                    out[f"{dst}.mlp.experts.local_experts.{e}.linear_fc1.weight"] = gate_up[e]
                    out[f"{dst}.mlp.experts.local_experts.{e}.linear_fc2.weight"] = down[e]
        else:
            gate, up = hf_state[f"{src}.mlp.gate_proj.weight"], hf_state[f"{src}.mlp.up_proj.weight"]
            out[f"{dst}.mlp.linear_fc1.weight"] = torch.cat([gate, up])
    return out
