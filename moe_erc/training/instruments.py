"""What routers and experts are doing, measured on the batches training already runs (no extra forwards).

A forward hook on every MoE router (any router class: top-k, ERC, AoE, K-Means) sees ``(probs,
routing_map)`` for every micro-batch and accumulates tokens per expert per layer. At a log step
:meth:`RoutingMonitor.train_stats` reduces them over the ranks that routed different tokens and returns
per-layer load statistics; :meth:`RoutingMonitor.valid_stats` does the same over a whole evaluation and adds
the router–expert coupling scores. A bounded routing trace is written on sampled steps.

The hook counts each forward once: a forward that runs inside a backward pass (activation recompute:
megatron's ``tensor_parallel.checkpoint``, ``torch.utils.checkpoint`` reentrant or not) is skipped.

Definitions (per layer; ``c`` = tokens per expert, ``n`` experts):

* ``maxvio = (max c - mean c) / mean c`` (0 when perfectly balanced; per batch, or over the validation set)
* ``dead_experts``: experts that received no token in the whole log window
* ``router_cosine``: mean ``|cos|`` between distinct router rows (only routers with a ``weight`` matrix)
* ``coupling``: mean over a seeded random sample of tokens of the Spearman rank correlation, over all ``n``
  experts, between the router's scores ``router.gating(x)`` and the experts' gate-activation norms
  ``||x Wg_j||`` (:func:`coupling_scores`); 0 for an untrained layer, 1 for a perfectly coupled one.
* ``coupling_topk``: mean over the same tokens of ``|S ∩ G| / |S|``, ``S`` the experts the router sent the
  token to, ``G`` the ``|S|`` experts with the largest gate norms; ``K/n`` at chance, 1 when coupled.

See docs/instruments.md for why these are comparable across routers (vanilla, ERC, AoE, K-Means,
aux-loss-free) and how the token sample is drawn so that every parallel layout measures the same tokens.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from moe_erc.compat import comm_device, import_megatron
from moe_erc.model.layers.erc_layer import gate_weights, layer_slot

import_megatron()
from megatron.core import parallel_state  # noqa: E402


def _routers(model_chunks):
    """(global layer number, MoE layer module) for every MoE layer this rank holds."""
    for chunk in model_chunks:
        for module in chunk.modules():
            router = getattr(module, "router", None)
            if router is not None and getattr(module, "experts", None) is not None and router.layer_number:
                yield layer_slot(router), module


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


def _size(group) -> int:
    return dist.get_world_size(group) if group is not None and dist.is_initialized() else 1


def in_backward() -> bool:
    """True while autograd runs a backward pass on this thread: a forward seen now is a recomputation
    (megatron's ``CheckpointFunction`` and reentrant ``torch.utils.checkpoint`` re-run the forward inside
    their backward; non-reentrant checkpointing re-runs it from a saved-tensor unpack hook, also inside)."""
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


# ------------------------------------------------------------------------------------------------
# The coupling score


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """``[T, n]`` -> ``[T, n]`` float64 ranks ``0..n-1`` of each row, tied values sharing their mean rank."""
    v = values.double().contiguous()
    ordered, order = v.sort(dim=-1)
    lo = torch.searchsorted(ordered, ordered, side="left")
    hi = torch.searchsorted(ordered, ordered, side="right") - 1
    return torch.empty_like(v).scatter_(-1, order, (lo + hi).double() / 2)


def spearman_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[T, n]``, ``[T, n]`` -> ``[T]`` Spearman rank correlation of each row pair (NaN where a row is constant)."""
    ra, rb = average_ranks(a), average_ranks(b)
    ra = ra - ra.mean(-1, keepdim=True)
    rb = rb - rb.mean(-1, keepdim=True)
    den = ((ra * ra).sum(-1) * (rb * rb).sum(-1)).sqrt()
    return torch.where(den > 0, (ra * rb).sum(-1) / den.clamp_min(1e-300), torch.full_like(den, float("nan")))


def topk_overlap(selected: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """``[T, n]`` bool routing map, ``[T, n]`` gate norms -> ``[T]`` ``|S ∩ G| / |S|``: ``S`` the selected
    experts, ``G`` the ``|S|`` experts with the largest norms (NaN where nothing is selected)."""
    k = selected.sum(-1)
    g = norms.double().contiguous()
    larger = g.shape[-1] - torch.searchsorted(g.sort(dim=-1).values, g, side="right")  # strictly larger norms
    hits = (selected.bool() & (larger < k.unsqueeze(-1))).sum(-1)
    undefined = torch.full(k.shape, float("nan"), dtype=torch.float64, device=k.device)
    return torch.where(k > 0, hits.double() / k.clamp_min(1), undefined)


def coupling_scores(scores: torch.Tensor, norms: torch.Tensor,
                    selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token: (Spearman of router scores vs gate norms over all ``n`` experts, top-K overlap)."""
    return spearman_rows(scores, norms), topk_overlap(selected, norms)


def coupling_sample(seq_length: int, micro_batch: int, count: int, seed: int) -> torch.Tensor:
    """Sorted flat indices ``p * micro_batch + j`` (position ``p``, sequence ``j``) of ``min(count, all)``
    tokens of a ``[seq_length, micro_batch]`` micro-batch, uniform without replacement, from ``seed`` alone:
    the same tokens in every layout (under sequence parallelism each rank measures those it holds)."""
    total = seq_length * micro_batch
    generator = torch.Generator().manual_seed((seed * 1_000_003 + 7_907) % (2**63 - 1))
    return torch.randperm(total, generator=generator)[: min(count, total)].sort().values


def local_rows(sample: torch.Tensor, micro_batch: int, first_position: int, local_positions: int) -> torch.Tensor:
    """Rows of this rank's ``[local_positions, micro_batch]``-flattened tokens that are in ``sample``
    (global flat indices), this rank holding positions ``first_position .. first_position + local_positions``."""
    position, sequence = sample // micro_batch, sample % micro_batch
    mine = (position >= first_position) & (position < first_position + local_positions)
    return (position[mine] - first_position) * micro_batch + sequence[mine]


def _local_gate_squares(experts, hidden: torch.Tensor, gated: bool) -> Optional[torch.Tensor]:
    """``[N, d] -> [N, m_local]`` squared norms of each local expert's gate pre-activation on this rank's
    share of its gate rows (summed over expert-TP by the caller); None for unknown expert layouts."""
    if hasattr(experts, "gate_activation_norms"):  # AoE: (x Wdown_j) Wup_j, never split over expert-TP
        return experts.gate_activation_norms(hidden).double() ** 2
    try:
        weights = gate_weights(experts, gated)
    except NotImplementedError:
        return None
    return torch.stack([(hidden @ w.float().t()).double().pow(2).sum(-1) for w in weights], dim=1)


def all_gate_norms(experts, hidden: torch.Tensor, gated: bool) -> Optional[torch.Tensor]:
    """``[N, d]`` tokens of this rank -> ``[N, n]`` gate norms of all ``n`` experts. Collective over the
    expert-TP x EP group: tokens are gathered there, each rank measures its experts on its gate rows, partial
    squares are summed over expert-TP and the columns gathered over EP (experts in EP-rank order)."""
    x, mine = _gather_rows_varlen(hidden.float(), parallel_state.get_expert_tensor_and_model_parallel_group())
    squares = _local_gate_squares(experts, x, gated)
    if squares is None:
        return None
    etp = parallel_state.get_expert_tensor_parallel_group()
    if _size(etp) > 1:
        dist.all_reduce(squares, group=etp)
    ep = parallel_state.get_expert_model_parallel_group()
    if _size(ep) > 1:
        parts = [torch.empty_like(squares) for _ in range(_size(ep))]
        dist.all_gather(parts, squares.contiguous(), group=ep)
        squares = torch.cat(parts, dim=1)
    return squares[mine].sqrt()


class RoutingMonitor:
    """Forward hooks on every MoE router of the model; see the module docstring."""

    # per layer: sum of Spearman, tokens with a defined Spearman, sum of top-K overlap, tokens with one
    COUPLING_FIELDS = 4

    def __init__(self, model_chunks, num_layers: int, num_experts: int, run_dir: Optional[Path] = None,
                 trace_interval: int = 0, trace_tokens: int = 64, coupling_tokens: int = 256, seed: int = 0):
        self.model_chunks = model_chunks
        self.num_layers, self.num_experts = num_layers, num_experts
        # Counters stay on the device collectives use (the GPU under NCCL): no host sync per micro-batch.
        self.device = comm_device()
        self.window = torch.zeros(num_layers, num_experts, dtype=torch.float64, device=self.device)
        self.step_counts = torch.zeros_like(self.window)
        self.valid = torch.zeros_like(self.window)
        self.trace_interval, self.trace_tokens = trace_interval, trace_tokens
        self.coupling_tokens, self.seed = coupling_tokens, seed
        self.trace_path = run_dir / "routing_trace.jsonl" if run_dir is not None and trace_interval else None
        self.step = 0
        self._trace_rows: list[dict] = []
        self._coupling: Optional[torch.Tensor] = None  # [num_layers, COUPLING_FIELDS] while validating
        self._samples: dict[tuple, torch.Tensor] = {}
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
            if in_backward():  # activation recompute: the first forward of these tokens was counted
                return
            routing_map = outputs[1]
            counts = routing_map.sum(0).to(device=self.device, dtype=torch.float64)
            if router.training:
                self.window[layer - 1] += counts
                self.step_counts[layer - 1] += counts
                if self._tracing():
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

    def sample_rows(self, hidden: torch.Tensor, sequence_parallel: bool) -> torch.Tensor:
        """Rows of this rank's flattened router input ``[s_local, b, d]`` that are in the coupling sample."""
        local_positions, micro_batch = hidden.shape[0], (hidden.shape[1] if hidden.dim() == 3 else 1)
        tp = parallel_state.get_tensor_model_parallel_world_size() if sequence_parallel else 1
        first = parallel_state.get_tensor_model_parallel_rank() * local_positions if tp > 1 else 0
        key = (local_positions * tp, micro_batch, first, local_positions, str(hidden.device))
        if key not in self._samples:
            sample = coupling_sample(local_positions * tp, micro_batch, self.coupling_tokens, self.seed)
            self._samples[key] = local_rows(sample, micro_batch, first, local_positions).to(hidden.device)
        return self._samples[key]

    def _measure_coupling(self, layer: int, moe_layer, hidden: torch.Tensor, routing_map: torch.Tensor) -> None:
        """Coupling scores of this rank's sampled tokens (collective over the expert-TP x EP group)."""
        router = moe_layer.router
        if not hasattr(router, "gating"):
            return
        rows = self.sample_rows(hidden, bool(getattr(router.config, "sequence_parallel", False)))
        x = hidden.detach().reshape(-1, hidden.shape[-1])[rows]
        with torch.no_grad():
            norms = all_gate_norms(moe_layer.experts, x, router.config.gated_linear_unit)
            if norms is None:
                return
            cached = getattr(router, "cached_low", None)  # AoE caches x Wdown for its experts: keep the real one
            scores = router.gating(x).float()
            if hasattr(router, "cached_low"):
                router.cached_low = cached
            rank_corr, overlap = coupling_scores(scores, norms, routing_map[rows])
        defined_corr, defined_overlap = ~torch.isnan(rank_corr), ~torch.isnan(overlap)
        values = torch.stack([rank_corr.nan_to_num(0.0).sum(), defined_corr.sum().double(),
                              overlap.nan_to_num(0.0).sum(), defined_overlap.sum().double()])
        self._coupling[layer - 1] += values.to(device=self.device, dtype=torch.float64)

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
        self._coupling = torch.zeros(self.num_layers, self.COUPLING_FIELDS, dtype=torch.float64, device=self.device)

    def valid_stats(self) -> dict[str, list]:
        """Global MaxVio over the whole evaluation and the coupling scores, per layer. Collective."""
        pp = parallel_state.get_pipeline_model_parallel_group()
        counts = _sum(_sum(self.valid.clone(), _token_group()), pp).cpu()
        # every rank scored the sampled tokens it holds: sum over the ranks that hold different tokens
        coupling = _sum(_sum(self._coupling, _token_group()), pp).cpu()
        self._coupling = None
        rank_sum, rank_n, overlap_sum, overlap_n = coupling.unbind(-1)
        return {"maxvio_global": _per_layer(maxvio(counts), counts),
                "coupling": [float(s / c) if c > 0 else None for s, c in zip(rank_sum, rank_n)],
                "coupling_topk": [float(s / c) if c > 0 else None for s, c in zip(overlap_sum, overlap_n)]}

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


def _gather_rows_varlen(x: torch.Tensor, group) -> tuple[torch.Tensor, slice]:
    """All-gather ``[N_rank, ...]`` rows (N may differ by rank) over ``group`` in group-rank order (no
    gradient); returns them and the slice that holds this rank's own rows."""
    size = _size(group)
    if size == 1:
        return x, slice(0, x.shape[0])
    count = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
    counts = [torch.empty_like(count) for _ in range(size)]
    dist.all_gather(counts, count, group=group)
    counts = [int(c) for c in counts]
    padded = x.new_zeros(max(counts), *x.shape[1:])
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded, group=group)
    rank = dist.get_rank(group)
    start = sum(counts[:rank])
    return torch.cat([part[:c] for part, c in zip(parts, counts)]), slice(start, start + counts[rank])


def mean_of(values: list) -> Optional[float]:
    present = [v for v in values if v is not None and not math.isnan(v)]
    return sum(present) / len(present) if present else None


# How a per-layer statistic is summarised over layers for the console / scalar logs.
_SUMMARY = {"dead_experts": sum, "maxvio": mean_of, "maxvio_global": mean_of, "coupling": mean_of,
            "coupling_topk": mean_of, "router_cosine": mean_of, "expert_bias_norm": mean_of}


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
