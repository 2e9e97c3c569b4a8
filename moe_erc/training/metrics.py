"""Where numbers go: console progress line, ``metrics.jsonl``, TensorBoard and wandb.

Only the logging rank (the last one, which holds the loss) writes. Every record is one JSON line
``{"step": int, "split": "train"|"valid", ...scalars}`` so runs can be compared with any tool.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from moe_erc.compat import import_megatron
from moe_erc.config import Config, layer_rows
from moe_erc.model.layers.erc_layer import erc_layer_stats, router_matrix_stats
from moe_erc.training.instruments import layer_summaries

import_megatron()
from megatron.core import parallel_state  # noqa: E402
from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker  # noqa: E402
from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper  # noqa: E402


def moe_layer_metrics(loss_scale: float) -> dict[str, list[float]]:
    """Per-layer values megatron's MoE layers recorded this step (load_balancing_loss, z_loss, ...),
    reduced over PP (sum of disjoint layers), the recorder's own group, and DP (mean). Collective.

    megatron's tracker averages with ``ReduceOp.AVG``, which gloo lacks, so the reduction is done here
    with sums. Values are scaled by ``loss_scale`` (1 / micro-batches) and the tracker is cleared.
    """
    tracker = get_moe_metrics_tracker()
    result = {}
    dp_group = parallel_state.get_data_parallel_group()
    for name in sorted(tracker.metrics):
        entry = tracker.metrics[name]
        values = entry.values.detach().clone().float()
        dist.all_reduce(values, group=parallel_state.get_pipeline_model_parallel_group())
        if entry.reduce_group is not None:
            dist.all_reduce(values, group=entry.reduce_group)
        if entry.avg_group is not None:
            dist.all_reduce(values, group=entry.avg_group)
            values /= dist.get_world_size(entry.avg_group)
        if entry.needs_dp_avg:
            dist.all_reduce(values, group=dp_group)
            values /= dist.get_world_size(dp_group)
        result[name] = (values * loss_scale).tolist()
    tracker.clear()
    return result


def clear_moe_layer_metrics() -> None:
    """Drop what megatron's MoE layers and multi-token-prediction layers recorded since the last read."""
    get_moe_metrics_tracker().clear()
    MTPLossLoggingHelper.clean_metrics_in_tracker()


def mtp_metrics(loss_scale: float) -> dict:
    """``mtp_loss`` (mean over MTP layers of their cross-entropy, before ``model.mtp_loss_scaling_factor``) and
    ``mtp_loss_per_layer`` of this step, from megatron's MTP tracker, averaged over DP with sums (gloo has no AVG);
    ``loss_scale``: 1 / micro-batches. Collective over the ranks that hold the MTP layers; clears the tracker."""
    tracker = MTPLossLoggingHelper.tracker
    if "loss_values" not in tracker:
        return {}
    values = tracker["loss_values"].detach().clone().double()
    if tracker.get("reduce_group") is not None:
        dist.all_reduce(values, group=tracker["reduce_group"])
    if tracker.get("avg_group") is not None:
        dist.all_reduce(values, group=tracker["avg_group"])
        values /= dist.get_world_size(tracker["avg_group"])
    MTPLossLoggingHelper.clean_metrics_in_tracker()
    per_layer = (values * loss_scale).tolist()
    return {"mtp_loss": sum(per_layer) / len(per_layer), "mtp_loss_per_layer": per_layer}


def layer_means(stats: dict[str, list[float]]) -> dict:
    """Mean over MoE layers of each statistic (min for margins and eps_min, max for eps_max), plus the lists."""
    out = {}
    for name, per_layer in stats.items():
        values = [v for v in per_layer if not math.isnan(v)]
        if values:
            out[name] = min(values) if name in ("erc_margin", "eps_min") else (
                max(values) if name == "eps_max" else sum(values) / len(values))
            out[f"{name}_per_layer"] = per_layer
    return out


def erc_scalars(model_chunks, cfg: Config) -> dict:
    """The ERC statistics of every MoE layer (loss, eps, margin), as :func:`layer_means`. Collective."""
    return layer_means(erc_layer_stats(model_chunks, layer_rows(cfg)))


def router_scalars(model_chunks, cfg: Config, posthoc_alpha: Optional[float] = None) -> dict:
    """eps of the router rows for every method with a router matrix, and with ``posthoc_alpha`` the ERC loss at
    that alpha on clean rows, as :func:`layer_means`. Collective."""
    return layer_means(router_matrix_stats(model_chunks, layer_rows(cfg), posthoc_alpha=posthoc_alpha))


def train_record(scalars: dict, model_chunks, cfg: Config, monitor, num_microbatches: int) -> dict:
    """Everything a log step reports: the step's scalars (its gradient norm read on the host: the one read of
    a log step), megatron's load-balancing / z losses, the routing load (``monitor``'s window), ERC or router
    statistics. Collective."""
    scalars["grad_norm"] = float(scalars["grad_norm"])
    for name, per_layer in moe_layer_metrics(1.0 / num_microbatches).items():
        scalars[name] = sum(per_layer) / max(len([v for v in per_layer if v]), 1)
    scalars.update(mtp_metrics(1.0 / num_microbatches))
    scalars.update(layer_summaries(monitor.train_stats(end_of_window=True)))
    scalars.update(erc_scalars(model_chunks, cfg) if cfg.erc.enabled else router_scalars(model_chunks, cfg))
    return scalars


class MetricsWriter:
    """Fan-out of scalar records to JSONL, TensorBoard and wandb (logging rank only)."""

    def __init__(self, cfg: Config, run_dir: Path, enabled: bool):
        self.enabled = enabled
        self.max_scalars = cfg.logging.max_scalars
        self._jsonl = None
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        self._jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if cfg.logging.wandb and cfg.logging.wandb_mode != "disabled":
            os.environ.setdefault("WANDB_MODE", cfg.logging.wandb_mode)
            import wandb

            self._wandb = wandb.init(project=cfg.logging.wandb_project, dir=str(run_dir),
                                     name=run_dir.name, config=cfg.to_dict(), resume="allow")

    def write(self, step: int, split: str, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "split": split, "time": round(time.time(), 3), **scalars}
        self._jsonl.write(json.dumps(record) + "\n")
        scalars_out, histograms = self._flatten(scalars)
        if self._tb is not None:
            for key, value in scalars_out.items():
                self._tb.add_scalar(f"{split}/{key}", value, step)
            for key, values in histograms.items():
                self._tb.add_histogram(f"{split}/{key}", torch.tensor(values), step)
        if self._wandb is not None:
            self._wandb.log({f"{split}/{k}": v for k, v in scalars_out.items()}, step=step)

    def _flatten(self, scalars: dict) -> tuple[dict[str, float], dict[str, list]]:
        """Scalars (per-layer lists become ``key/layer_k`` while under ``logging.max_scalars``) and
        per-expert tables as one histogram per layer."""
        plain, per_layer, histograms = {}, {}, {}
        for key, value in scalars.items():
            if isinstance(value, list) and value and any(isinstance(v, list) for v in value):
                histograms.update({f"{key}/layer_{i + 1}": v for i, v in enumerate(value) if v})
            elif isinstance(value, list):
                per_layer.update({f"{key}/layer_{i + 1}": v for i, v in enumerate(value)})
            else:
                plain[key] = value
        if len(plain) + len(per_layer) <= self.max_scalars:
            plain.update(per_layer)
        finite = {k: v for k, v in plain.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        return dict(list(finite.items())[: self.max_scalars]), histograms

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """One console line per log interval: step, loss, lr, tokens/s, elapsed/ETA."""

    def __init__(self, total_steps: int, start_step: int, enabled: bool):
        self.total = total_steps
        self.start_step = start_step
        self.enabled = enabled
        self.t0 = time.perf_counter()

    def line(self, step: int, loss: float, lr: float, tokens_per_s: float, extra: Optional[dict] = None) -> str:
        elapsed = time.perf_counter() - self.t0
        done = step - self.start_step
        eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
        width = len(str(self.total))
        text = (f"step {step:>{width}}/{self.total} | loss {loss:.4f} | lr {lr:.2e} | "
                f"{tokens_per_s:,.0f} tok/s | {format_duration(elapsed)} elapsed, "
                f"ETA {format_duration(eta) if math.isfinite(eta) else '--:--'}")
        for key, value in (extra or {}).items():
            text += f" | {key} {value:.4g}"
        return text

    def print(self, text: str) -> None:
        if self.enabled:
            print(text, flush=True)

    def report(self, step: int, scalars: dict) -> None:
        """The console line of a train record (:func:`train_record`)."""
        extra = {k: scalars[v] for k, v in self.SHOWN.items() if scalars.get(v) is not None}
        self.print(self.line(step, scalars["lm_loss"], scalars["lr"], scalars["tokens_per_s"], extra))

    # console name -> record key, shown after the fixed fields when the record has them
    SHOWN = {"lb": "load_balancing_loss", "seq-lb": "seq_load_balancing_loss", "mtp": "mtp_loss",
             "maxvio": "maxvio", "dead": "dead_experts", "erc": "erc_loss", "eps": "eps_mean"}
