"""Symmetry-compatible updates (Lau & Su, arXiv 2605.18106) on megatron-core's Muon.

Each weight block's update should be equivariant under that block's symmetry group. ``G`` is the
(Nesterov) momentum of one block in torch Linear layout ``[out, in]`` (a stacked expert weight
``[experts, out, in]`` is one block per expert); ``polar(X) = U V^T`` for ``X = U S V^T`` (Newton-Schulz,
as megatron's Muon computes it); ``s`` is megatron's Muon scale (``muon_scale_mode``, on the full unsharded
shape) and ``k`` is ``muon_extra_scale_factor``:

=================  ============================================================  ==============================
rule               update                                                        symmetry group it respects
=================  ============================================================  ==============================
spectral           ``k s polar(G)``                                              ``O(out) x O(in)``
row_norm           ``k sqrt(in) g_i / |g_i|`` per row                            ``S_out x O(in)``
hybrid             ``k s polar(rownorm(G))``                                     ``S_out x O(in)``
row_aware          ``k s polar(N^-1 G)``, ``N`` = joint norm of neuron j's       ``S_D`` (gate, up jointly)
                   rows (``gate_j``, ``up_j`` in a SwiGLU fc1)                   ``x O(in)``
col_aware          ``k s polar(G N^-1)``, ``N`` = column norms                   ``O(out) x S_D``
centered_row_norm  ``C = G - 1 mean_rows(G)``, ``U = k sqrt(in) rownorm(C)``,    ``S_E x O(in)``, shared
                   then ``U - 1 mean_rows(U)``                                   shift ``W + 1 v^T``
left_spectral      ``k s polar(C)``, then recentered                             ``S_E x O(in)``, shared shift
adamw              megatron's AdamW (vectors: norms, biases)                     coordinate-wise
=================  ============================================================  ==============================

Lau & Su's own rules (their code, timlautk/equivariant_optimizers; ``optimizer.symmetric_preset: paper``) take
the EMA momentum ``M`` without Nesterov and no shape scale: the learning rate is the step's size itself.

=================  ============================================================  ==============================
row_unit           ``m_i / (|m_i| + 1e-8)`` per row (their ``RowNormM``)           ``S_out x O(in)``
centered_row_unit  ``C = M - 1 mean_rows(M)``, row_unit(C), then recentered        ``S_E x O(in)``, shared shift
left_polar_nuclear ``|C|_* polar(C)``, recentered (their ``LeftPolarGradM``,        ``S_E x O(in)``, shared shift
                   alpha=1: the nuclear norm times the left-spectral direction)
spectral_heads     ``k s polar`` per attention head: QKV rows in blocks of          ``O(head_dim) x O(in)`` per
                   ``head_dim``, output-projection columns likewise               head
=================  ============================================================  ==============================

Under tensor parallelism every row- or column-wise quantity (row norms, a neuron's gate and up rows,
column norms) lives on one rank, so ``row_norm`` and ``centered_row_norm`` never communicate; ``polar``
needs the whole matrix, which is all-gathered over the (expert-)TP group along the parameter's
``partition_dim``, orthogonalized on every rank and sliced back (megatron's ``duplicated`` mode), so every
layout computes the single-process update. Expert parallelism needs nothing: each rule acts per expert.

:class:`SymmetricMuon` is megatron's ``TensorParallelMuon`` (same momentum, weight decay, Newton-Schulz,
QKV split) whose ``orthogonalize`` applies the parameter's rule; it is registered in megatron's emerging
optimizer registry, so ``get_megatron_optimizer`` builds, chains (AdamW for vectors), wraps (fp32 / bf16)
and checkpoints it like megatron's own Muon. docs/optimizers.md has the derivations and the choices.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from moe_erc.compat import import_megatron

import_megatron()
from megatron.core.optimizer import emerging_optimizers as _eo  # noqa: E402
from megatron.core.optimizer.optimizer_config import ParamKey, ParamPredicate  # noqa: E402

HAVE_EMERGING_OPTIMIZERS = _eo.HAVE_EMERGING_OPTIMIZERS
RULES = ("spectral", "spectral_heads", "row_norm", "hybrid", "row_aware", "col_aware", "centered_row_norm",
         "left_spectral", "row_unit", "centered_row_unit", "left_polar_nuclear", "adamw")
# Rules updated from the EMA momentum itself (no Nesterov), as the authors' RowNormM and LeftPolarGradM.
MOMENTUM_RULES = ("row_unit", "centered_row_unit", "left_polar_nuclear")
PAPER_EPS = 1e-8  # their row_mode "inverse_eps": m / (|m| + eps)
REGISTRY_NAME = {"muon": "moe_erc_muon", "symmetric": "moe_erc_symmetric"}  # names in megatron's registry
# Parameter attributes the rules read; megatron's bf16 optimizer copies only its own onto the fp32 main
# parameters, so :func:`propagate_tags` copies these too (megatron's Muon needs expert_tp / is_qkv there).
TAGS = ("symmetry_rule", "glu_halves", "expert_tp", "is_qkv", "qkv_split_shapes", "head_dim", "head_layout",
        "param_class")
EPS = 1e-12


# ------------------------------------------------------------------------------------------ the rules


def row_normalize(x: torch.Tensor, pair_halves: bool = False) -> torch.Tensor:
    """Rows (last dim) scaled to unit norm; zero rows stay zero. ``pair_halves``: row j and row j + n/2 of
    the last-but-one axis form one SwiGLU neuron (``[gate; up]``) and share one norm."""
    sq = x.square().sum(-1, keepdim=True)
    if pair_halves:
        gate, up = sq.chunk(2, dim=-2)
        sq = torch.cat([gate + up, gate + up], dim=-2)
    return x / sq.sqrt().clamp_min(EPS)


def col_normalize(x: torch.Tensor) -> torch.Tensor:
    """Columns (last-but-one axis summed) scaled to unit norm; zero columns stay zero."""
    return x / x.square().sum(-2, keepdim=True).sqrt().clamp_min(EPS)


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """The authors' row normalisation: ``x_i / (|x_i| + 1e-8)`` (a zero row stays zero)."""
    return x / (x.norm(dim=-1, keepdim=True) + PAPER_EPS)


def center_rows(x: torch.Tensor, group=None) -> torch.Tensor:
    """``x - 1 mean_rows(x)``: removes the component a shared shift of every row would add. ``group``: the
    rows are sharded over it (the mean is all-reduced)."""
    if group is None:
        return x - x.mean(dim=-2, keepdim=True)
    total = x.sum(dim=-2, keepdim=True)
    dist.all_reduce(total, group=group)
    return x - total / (x.shape[-2] * dist.get_world_size(group))


def _gather(x: torch.Tensor, group, dim: int | None) -> torch.Tensor:
    if dim is None or group is None or dist.get_world_size(group) == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _local(x: torch.Tensor, group, dim: int | None) -> torch.Tensor:
    if dim is None or group is None or dist.get_world_size(group) == 1:
        return x
    return x.chunk(dist.get_world_size(group), dim=dim)[dist.get_rank(group)].contiguous()


def polar(x: torch.Tensor, steps: int, coefficient_type: str, group=None, dim: int | None = None) -> torch.Tensor:
    """Newton-Schulz ``polar`` of a 2-D or batched 3-D fp32 tensor sharded along ``dim`` over ``group``
    (gathered, orthogonalized whole, sliced back)."""
    from emerging_optimizers.orthogonalized_optimizers.muon_utils import newton_schulz

    return _local(newton_schulz(_gather(x, group, dim), steps=steps, coefficient_type=coefficient_type),
                  group, dim)


def apply_rule(rule: str, g: torch.Tensor, *, steps: int = 5, coefficient_type: str = "quintic",
               scale_mode: str = "spectral", extra_scale: float = 1.0, glu_halves: bool = False,
               group=None, partition_dim: int | None = None, head_dim: int | None = None,
               head_layout: str = "rows") -> torch.Tensor:
    """The update of one block (``[out, in]``, or ``[experts, out, in]``) from its momentum ``g``.

    ``group``/``partition_dim``: the TP group and the axis ``g`` is sharded along (None: not sharded).
    ``spectral_heads``: ``head_dim`` and whether heads are blocks of rows (QKV) or of columns (projection).
    """
    from emerging_optimizers.orthogonalized_optimizers.muon import get_muon_scale_factor

    g = g.float()
    tp = dist.get_world_size(group) if partition_dim is not None and group is not None else 1
    rows, cols = g.shape[-2] * (tp if partition_dim == g.dim() - 2 else 1), \
        g.shape[-1] * (tp if partition_dim == g.dim() - 1 else 1)
    spectral_scale = get_muon_scale_factor(rows, cols, mode=scale_mode) * extra_scale

    def orth(x):
        return polar(x, steps, coefficient_type, group, partition_dim) * spectral_scale

    if rule == "spectral":
        return orth(g)
    if rule == "row_norm":
        return row_normalize(g) * (math.sqrt(cols) * extra_scale)
    if rule == "hybrid":
        return orth(row_normalize(g))
    if rule == "row_aware":
        return orth(row_normalize(g, pair_halves=glu_halves))
    if rule == "col_aware":
        # Column norms of a row-sharded matrix would need a reduction; megatron shards fc2 by columns.
        if partition_dim == g.dim() - 2 and tp > 1:
            raise ValueError("col_aware expects a matrix sharded by columns (row-parallel), or not sharded")
        return orth(col_normalize(g))
    if rule == "centered_row_norm":
        u = row_normalize(center_rows(g)) * math.sqrt(cols)
        return center_rows(u) * extra_scale
    if rule == "left_spectral":  # polar(C) has zero row-sum in exact arithmetic; recentering makes it exact
        return center_rows(orth(center_rows(g)))
    if rule == "row_unit":
        return unit_rows(g)
    if rule == "centered_row_unit":  # a vocab-parallel LM head: the mean over rows spans the TP group
        rows_group = group if partition_dim == g.dim() - 2 and tp > 1 else None
        return center_rows(unit_rows(center_rows(g, rows_group)), rows_group)
    if rule == "left_polar_nuclear":  # |C|_* = tr(polar(C)^T C): no SVD, no host read
        if partition_dim is not None and tp > 1:
            raise ValueError("left_polar_nuclear expects a replicated matrix (a router), not a TP shard")
        c = center_rows(g)
        o = polar(c, steps, coefficient_type)
        return center_rows((o * c).sum(dim=(-2, -1), keepdim=True) * o)
    if rule == "spectral_heads":  # heads are whole on every TP rank: no gather
        if head_layout == "rows":
            blocks = g.reshape(-1, head_dim, g.shape[-1])
        else:
            blocks = g.reshape(g.shape[0], -1, head_dim).transpose(0, 1)
        scale = get_muon_scale_factor(blocks.shape[-2], blocks.shape[-1], mode=scale_mode) * extra_scale
        u = polar(blocks, steps, coefficient_type) * scale
        return u.reshape(g.shape) if head_layout == "rows" else u.transpose(0, 1).reshape(g.shape)
    raise ValueError(f"unknown update rule {rule!r}; choose one of {RULES}")


# ------------------------------------------------------------------------------- rules per parameter


def rule_for(name: str, param: torch.nn.Parameter, optimizer: str, embedding_rule: str = "row_norm",
             router_rule: str = "centered_row_norm", mlp_rule: str = "aware", router_shift_invariant: bool = True,
             class_rules: dict[str, str] | None = None) -> str:
    """The update rule of one named parameter of our GPT model under ``optimizer`` (muon | symmetric).

    ``muon``: megatron's assignment (every matrix spectral, embeddings/LM head and vectors AdamW), with
    stacked expert weights orthogonalized per expert instead of falling back to AdamW.
    ``symmetric``: embeddings/LM head ``embedding_rule``; attention and other matrices spectral; (expert)
    SwiGLU fc1 row-aware and fc2 column-aware (``mlp_rule=spectral``: both spectral); router
    ``router_rule`` when the router's scores ignore a shared shift (softmax), else row_norm (sigmoid).
    ``class_rules``: a rule per parameter class (moe_erc/training/param_groups.py), before either assignment.
    """
    from moe_erc.training.param_groups import param_class

    if param.dim() < 2 or param.dim() > 3:
        return "adamw"
    if class_rules and param_class(name, param) in class_rules:
        return class_rules[param_class(name, param)]
    embedding = "word_embeddings" in name or "position_embeddings" in name or name.startswith("output_layer") \
        or ".output_layer." in name
    if optimizer == "muon":
        return "adamw" if embedding else "spectral"
    if embedding:
        return embedding_rule
    leaf = name.rsplit(".", 1)[-1]
    if name.endswith(".router.weight"):
        return router_rule if router_shift_invariant else "row_norm"
    if mlp_rule == "aware" and ".mlp." in name and "router" not in name:
        if "linear_fc1" in name or leaf == "weight1":
            return "row_aware"
        if "linear_fc2" in name or leaf == "weight2":
            return "col_aware"
    return "spectral"


def tag_parameters(model_chunks, optimizer: str, gated: bool, head_dim: int | None = None,
                   **rule_options) -> dict[str, str]:
    """Set ``param.symmetry_rule`` (and ``glu_halves`` on SwiGLU fc1 weights, ``head_dim``/``head_layout`` on
    head-wise attention weights) on every trainable parameter; returns ``{name: rule}``."""
    rules = {}
    for chunk in model_chunks:
        for name, param in chunk.named_parameters():
            if not param.requires_grad:
                continue
            rule = rule_for(name, param, optimizer, **rule_options)
            param.symmetry_rule = rule
            param.glu_halves = gated and rule == "row_aware" and ("linear_fc1" in name or name.endswith("weight1"))
            if rule == "spectral_heads":
                if head_dim is None or "linear_qkv" not in name and "linear_proj" not in name:
                    raise ValueError(f"spectral_heads applies to attention QKV / output projections, not {name}")
                param.head_dim, param.head_layout = head_dim, "rows" if "linear_qkv" in name else "cols"
            if ".experts." in name and "shared" not in name:
                param.expert_tp = True  # megatron's Muon uses this to pick the expert-TP group
            rules[name] = rule
    return rules


def propagate_tags(model_chunks) -> None:
    """Copy the rule tags onto the fp32 main parameters megatron's bf16 optimizer made (``param.main_param``)."""
    for chunk in model_chunks:
        for param in chunk.parameters():
            main = getattr(param, "main_param", None)
            if main is not None:
                for tag in TAGS:
                    if hasattr(param, tag):
                        setattr(main, tag, getattr(param, tag))


def summarize(rules: dict[str, str]) -> str:
    """``spectral 8, row_norm 2, ...``: how many parameters each rule updates."""
    counts: dict[str, int] = {}
    for rule in rules.values():
        counts[rule] = counts.get(rule, 0) + 1
    return ", ".join(f"{rule} {counts[rule]}" for rule in RULES if rule in counts)


# ------------------------------------------------------------------------------------- the optimizer

if HAVE_EMERGING_OPTIMIZERS:

    class SymmetricMuon(_eo.TensorParallelMuon):
        """megatron's ``TensorParallelMuon`` applying each parameter's ``symmetry_rule`` (see module doc)."""

        def __init__(self, params, *args, **kwargs):
            self._ns = {"steps": kwargs.get("num_ns_steps", 5),
                        "coefficient_type": kwargs.get("coefficient_type", "quintic"),
                        "scale_mode": kwargs.get("scale_mode", "spectral"),
                        "extra_scale": kwargs.get("extra_scale_factor", 1.0)}
            super().__init__(params, *args, **kwargs)

        def orthogonalize(self, p: torch.Tensor, grad: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            rule = getattr(p, "symmetry_rule", "spectral")
            if rule in MOMENTUM_RULES:  # the authors' EMA momentum, without megatron's Nesterov mix
                grad = self.state[p]["momentum_buffer"]
            if rule == "spectral" and grad.dim() == 2:
                return super().orthogonalize(p, grad, **kwargs)  # megatron's path (QKV split, TP modes)
            group = None
            if self.pg_collection is not None:
                group = self.pg_collection.expt_tp if getattr(p, "expert_tp", False) else self.pg_collection.tp
            partition_dim = getattr(p, "partition_dim", None)
            if partition_dim == -1 or not getattr(p, "tensor_model_parallel", False) or self.tp_mode == "blockwise":
                partition_dim = None  # not sharded, or blockwise: each shard on its own (layout-dependent)
            return apply_rule(rule, grad, glu_halves=getattr(p, "glu_halves", False), group=group,
                              partition_dim=partition_dim, head_dim=getattr(p, "head_dim", None),
                              head_layout=getattr(p, "head_layout", "rows"), **self._ns).to(grad.dtype)

    def _uses_adamw(param) -> bool:
        return getattr(param, "symmetry_rule", "adamw") == "adamw"

    _ADAMW = {ParamKey(predicate=ParamPredicate(name="moe_erc_adamw", fn=_uses_adamw)): {"optimizer": "adam"}}
    for _name in REGISTRY_NAME.values():
        _eo._EMERGING_OPTIMIZERS[_name] = _eo.EmergingOptimizerEntry(
            optimizer_cls=SymmetricMuon, config_to_kwargs=_eo._muon_config_to_kwargs,
            default_param_overrides=_ADAMW)


# ------------------------------------------------------------------------------------------- the cost


def newton_schulz_flops(rows: int, cols: int, steps: int) -> float:
    """FLOPs of ``steps`` quintic Newton-Schulz iterations on one ``rows x cols`` matrix (on its short side
    ``m``: ``A = X X^T`` 2m^2n, ``B = bA + cA^2`` 2m^3, ``X = aX + BX`` 2m^2n per iteration)."""
    m, n = min(rows, cols), max(rows, cols)
    return steps * (4.0 * m * m * n + 2.0 * m ** 3)
