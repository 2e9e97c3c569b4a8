"""What routers and experts are doing, measured on the batches training already runs (no extra forwards).

A forward hook on every MoE router (any router class: top-k, ERC, AoE, K-Means) sees ``(probs,
routing_map)`` for every micro-batch and accumulates tokens per expert per layer. At a log step
:meth:`RoutingMonitor.train_stats` reduces them over the ranks that routed different tokens and returns
per-layer load statistics; :meth:`RoutingMonitor.valid_stats` does the same over a whole evaluation and adds
the router–expert coupling score. A bounded routing trace is written on sampled steps.

Definitions (per layer; ``c`` = tokens per expert, ``n`` experts):

* ``maxvio = (max c - mean c) / mean c`` (0 when perfectly balanced; per batch, or over the validation set)
* ``dead_experts``: experts that received no token in the whole log window
* ``router_cosine``: mean ``|cos|`` between distinct router rows (only routers with a ``weight`` matrix)
* ``coupling``: for a bounded sample of tokens, pairs (token, expert) for every selected expert plus one
  random other expert; per expert, the Pearson correlation between the router's score (softmax over all
  experts of the router logits) and the L2 norm of that expert's gate activation; mean over experts.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from moe_erc.compat import import_megatron

import_megatron()
from megatron.core import parallel_state  # noqa: E402


def _routers(model_chunks):
    """(global layer number, MoE layer module) for every MoE layer this rank holds."""
    for chunk in model_chunks:
        for module in chunk.modules():
            router = getattr(module, "router", None)
            if router is not None and getattr(module, "experts", None) is not None and router.layer_number:
                yield router.layer_number, module


def _token_group():
    """Ranks of this pipeline stage that route different tokens: DP, and TP under sequence parallelism."""
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        return parallel_state.get_tensor_and_data_parallel_group()
    return parallel_state.get_data_parallel_group()


def _sum(tensor: torch.Tensor, group) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, group=group)
    return tensor


def maxvio(counts: torch.Tensor) -> torch.Tensor:
    """``[..., n]`` tokens per expert -> ``[...]`` ``(max - mean) / mean`` (NaN where no tokens)."""
    mean = counts.float().mean(-1)
    return (counts.float().max(-1).values - mean) / mean


def router_cosine(weight: torch.Tensor) -> float:
    """Mean ``|cos|`` between distinct rows of ``[n, d]``."""
    rows = torch.nn.functional.normalize(weight.detach().float(), dim=1)
    cos = (rows @ rows.t()).abs()
    n = rows.shape[0]
    return float((cos.sum() - cos.diagonal().sum()) / (n * (n - 1)))


def gate_norms(experts, hidden: torch.Tensor, gated: bool) -> Optional[torch.Tensor]:
    """``[N, d] -> [N, m_local]`` L2 norms of each local expert's gate activation (pre-activation)."""
    if hasattr(experts, "gate_activation_norms"):
        return experts.gate_activation_norms(hidden)
    from moe_erc.erc_layer import gate_weights

    try:
        weights = gate_weights(experts, gated)
    except NotImplementedError:
        return None
    return torch.stack([(hidden @ w.float().t()).norm(dim=-1) for w in weights], dim=1)


class CouplingStats:
    """Per (layer, expert) sufficient statistics of the score/gate-norm correlation, summable over ranks."""

    FIELDS = 6  # count, sum s, sum g, sum s^2, sum g^2, sum s*g

    def __init__(self, num_layers: int, num_experts: int):
        self.stats = torch.zeros(num_layers, num_experts, self.FIELDS, dtype=torch.float64)

    def add(self, layer: int, expert: torch.Tensor, score: torch.Tensor, norm: torch.Tensor) -> None:
        s, g = score.double(), norm.double()
        values = torch.stack([torch.ones_like(s), s, g, s * s, g * g, s * g], dim=1)
        self.stats[layer - 1].index_add_(0, expert, values)

    def correlation(self) -> torch.Tensor:
        """``[num_layers]`` mean over experts of the per-expert Pearson correlation (NaN if undefined)."""
        n, s, g, ss, gg, sg = self.stats.unbind(-1)
        cov = sg / n - (s / n) * (g / n)
        var_s, var_g = ss / n - (s / n) ** 2, gg / n - (g / n) ** 2
        corr = cov / (var_s.clamp_min(0) * var_g.clamp_min(0)).sqrt()
        corr = torch.where((n > 2) & (var_s > 1e-18) & (var_g > 1e-18), corr, torch.full_like(corr, float("nan")))
        return corr.nanmean(dim=1)


class RoutingMonitor:
    """Forward hooks on every MoE router of the model; see the module docstring."""

    def __init__(self, model_chunks, num_layers: int, num_experts: int, run_dir: Optional[Path] = None,
                 trace_interval: int = 0, trace_tokens: int = 64, coupling_tokens: int = 256, seed: int = 0):
        self.model_chunks = model_chunks
        self.num_layers, self.num_experts = num_layers, num_experts
        # Counters stay on the device collectives use (the GPU under NCCL): no host sync per micro-batch.
        from moe_erc.parallel import comm_device

        self.device = comm_device()
        self.window = torch.zeros(num_layers, num_experts, dtype=torch.float64, device=self.device)
        self.step_counts = torch.zeros_like(self.window)
        self.valid = torch.zeros_like(self.window)
        self.trace_interval, self.trace_tokens = trace_interval, trace_tokens
        self.coupling_tokens, self.seed = coupling_tokens, seed
        self.trace_path = run_dir / "routing_trace.jsonl" if run_dir is not None and trace_interval else None
        self.step = 0
        self._trace_rows: list[dict] = []
        self._coupling: Optional[CouplingStats] = None
        self._current_tokens: Optional[torch.Tensor] = None
        self._handles = [module.router.register_forward_hook(self._make_hook(layer, module))
                         for layer, module in _routers(model_chunks)]

    # -- hooks ---------------------------------------------------------------------------------

    def set_batch(self, step: int, tokens: Optional[torch.Tensor]) -> None:
        """The trainer says which step runs and which token ids the next micro-batch holds ([b, s])."""
        self.step, self._current_tokens = step, tokens

    def _tracing(self) -> bool:
        return bool(self.trace_path) and self.step % self.trace_interval == 0

    def _make_hook(self, layer: int, moe_layer):
        def hook(router, inputs, outputs):
            routing_map = outputs[1]
            counts = routing_map.sum(0).to(device=self.device, dtype=torch.float64)
            if router.training:
                self.window[layer - 1] += counts
                self.step_counts[layer - 1] += counts
                if self._tracing() and torch.is_grad_enabled():
                    self._trace(layer, routing_map)
            else:
                self.valid[layer - 1] += counts
                if self._coupling is not None:
                    self._measure_coupling(layer, moe_layer, inputs[0], routing_map)
        return hook

    def _trace(self, layer: int, routing_map: torch.Tensor) -> None:
        """Top-K expert ids of the first ``trace_tokens`` tokens this rank routed (rank 0 of its DP/TP group)."""
        if _token_group() is not None and dist.get_rank(_token_group()) != 0:
            return
        rows = routing_map[: self.trace_tokens]
        experts = [torch.nonzero(row).flatten().tolist() for row in rows]
        token_ids = None
        if self._current_tokens is not None:  # hidden states are [s, b] flattened: row t = (t // b, t % b)
            b = self._current_tokens.shape[0]
            token_ids = [int(self._current_tokens[t % b, t // b]) for t in range(len(experts))
                         if t // b < self._current_tokens.shape[1]]
        self._trace_rows.append({"step": self.step, "layer": layer, "experts": experts, "token_ids": token_ids})

    def _measure_coupling(self, layer: int, moe_layer, hidden: torch.Tensor, routing_map: torch.Tensor) -> None:
        """Pairs from a bounded token sample; samples are gathered over EP so every expert's owner sees them."""
        router = moe_layer.router
        x = hidden.reshape(-1, hidden.shape[-1])[: self.coupling_tokens].detach()
        selected = routing_map[: x.shape[0]]
        if not hasattr(router, "gating") or x.shape[0] == 0 or \
                parallel_state.get_expert_tensor_parallel_world_size() > 1:  # gate rows split: skipped
            return
        ep_group = parallel_state.get_expert_model_parallel_group()
        if dist.get_world_size(ep_group) > 1:
            x = _gather_rows(x, ep_group)
            selected = _gather_rows(selected.to(torch.uint8), ep_group).bool()
        with torch.no_grad():
            logits = router.gating(x)
            if hasattr(router, "cached_low"):
                router.cached_low = None
            scores = torch.softmax(logits.float(), dim=-1)
            norms = gate_norms(moe_layer.experts, x.float(), router.config.gated_linear_unit)
        if norms is None:
            return
        generator = torch.Generator().manual_seed(self.seed * 7919 + layer)
        other = torch.randint(0, self.num_experts, (x.shape[0],), generator=generator)
        pairs = selected.clone().cpu()
        pairs[torch.arange(x.shape[0]), other] = True
        local = norms.shape[1]
        first = parallel_state.get_expert_model_parallel_rank() * local
        for e in range(local):
            tokens = pairs[:, first + e].nonzero().flatten()
            if tokens.numel():
                self._coupling.add(layer, torch.full_like(tokens, first + e), scores[tokens, first + e].cpu(),
                                   norms[tokens, e].cpu())

    # -- statistics ------------------------------------------------------------------------------

    def train_stats(self, end_of_window: bool) -> dict[str, list]:
        """Per-layer load statistics of the last step (and of the window if ``end_of_window``). Collective."""
        step = _sum(self.step_counts.clone(), _token_group())
        step = _sum(step, parallel_state.get_pipeline_model_parallel_group())
        self.step_counts.zero_()
        step = step.cpu()
        out = {"maxvio": _per_layer(maxvio(step), step)}
        if end_of_window:
            window = _sum(self.window.clone(), _token_group())
            window = _sum(window, parallel_state.get_pipeline_model_parallel_group())
            self.window.zero_()
            window = window.cpu()
            out["dead_experts"] = _per_layer((window == 0).sum(-1).double(), window)
            out["tokens_per_expert"] = [row.tolist() if row.sum() > 0 else None for row in window]
            out.update(self._router_stats())
            self._flush_trace()
        return out

    def _router_stats(self) -> dict[str, list]:
        cos = torch.zeros(self.num_layers, dtype=torch.float64, device=self.device)
        bias = torch.zeros(self.num_layers, dtype=torch.float64, device=self.device)
        present = torch.zeros(self.num_layers, dtype=torch.float64, device=self.device)
        for layer, module in _routers(self.model_chunks):
            router = module.router
            if isinstance(getattr(router, "weight", None), torch.Tensor):
                cos[layer - 1] = router_cosine(router.weight)
                present[layer - 1] = 1
            if getattr(router, "expert_bias", None) is not None:
                bias[layer - 1] = float(router.expert_bias.float().norm())
        pp = parallel_state.get_pipeline_model_parallel_group()
        _sum(cos, pp), _sum(bias, pp), _sum(present, pp)
        cos, bias, present = cos.cpu(), bias.cpu(), present.cpu()
        out = {}
        if present.sum() > 0:
            out["router_cosine"] = [float(c) if p else None for c, p in zip(cos, present)]
        if bias.sum() > 0:
            out["expert_bias_norm"] = bias.tolist()
        return out

    def start_validation(self) -> None:
        self.valid.zero_()
        self._coupling = CouplingStats(self.num_layers, self.num_experts)

    def valid_stats(self) -> dict[str, list]:
        """Global MaxVio over the whole evaluation and the coupling score, per layer. Collective."""
        counts = _sum(_sum(self.valid.clone(), _token_group()), parallel_state.get_pipeline_model_parallel_group())
        stats = self._coupling.stats.to(self.device)
        _sum(stats, dist.group.WORLD)  # each (layer, expert) pair was measured on one rank per token set
        self._coupling.stats = stats.cpu()
        coupling = self._coupling.correlation()
        self._coupling = None
        counts = counts.cpu()
        return {"maxvio_global": _per_layer(maxvio(counts), counts),
                "coupling": [None if math.isnan(v) else float(v) for v in coupling.tolist()]}

    def _flush_trace(self) -> None:
        if self.trace_path is not None and self._trace_rows:
            with open(self.trace_path, "a") as f:
                for row in self._trace_rows:
                    f.write(json.dumps(row) + "\n")
        self._trace_rows = []

    def close(self) -> None:
        self._flush_trace()
        for handle in self._handles:
            handle.remove()


def _per_layer(values: torch.Tensor, counts: torch.Tensor) -> list:
    """Layer values as a list, None for layers that are not MoE (no tokens counted)."""
    return [float(v) if c.sum() > 0 else None for v, c in zip(values, counts)]


def _gather_rows(x: torch.Tensor, group) -> torch.Tensor:
    """All-gather ``[N, ...]`` rows of equal N over ``group`` (no gradient)."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts)


def mean_of(values: list) -> Optional[float]:
    present = [v for v in values if v is not None and not math.isnan(v)]
    return sum(present) / len(present) if present else None


# How a per-layer statistic is summarised over layers for the console / scalar logs.
_SUMMARY = {"dead_experts": sum, "maxvio": mean_of, "maxvio_global": mean_of, "coupling": mean_of,
            "router_cosine": mean_of, "expert_bias_norm": mean_of}


def layer_summaries(stats: dict[str, list]) -> dict:
    """``{name: per-layer list}`` -> ``{name: summary over layers, name_per_layer: list}``; per-expert
    tables (``tokens_per_expert``) are kept as they are (lists of lists go to JSONL and histograms)."""
    out = {}
    for name, values in stats.items():
        if name in _SUMMARY:
            present = [v for v in values if v is not None]
            out[name] = _SUMMARY[name](present) if present else None
            out[f"{name}_per_layer"] = values
        else:
            out[name] = values
    return out
