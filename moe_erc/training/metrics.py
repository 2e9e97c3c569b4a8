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


SUPERSEDED = "metrics.superseded.jsonl"
WANDB_ID = "wandb_run_id"


def cut_after(path: Path, step: int) -> int:
    """Keep the records of ``path`` up to ``step`` (the checkpoint a resumed run starts from): the rows a crashed
    attempt wrote after it are moved to ``metrics.superseded.jsonl`` beside it, so each step appears once.
    Atomic (a new file renamed over the old one); a torn last line is dropped. Returns how many rows moved."""
    if not path.is_file():
        return 0
    lines, kept, moved = path.read_text().splitlines(), [], []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a row cut short by the crash
        (kept if int(record.get("step", 0)) <= step else moved).append(line)
    if len(kept) == len(lines):
        return 0
    with open(path.with_name(SUPERSEDED), "a") as side:
        side.writelines(line + "\n" for line in moved)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
    return len(moved)


class MetricsWriter:
    """Fan-out of scalar records to JSONL, TensorBoard and wandb (logging rank only).

    ``start_step``: the step the run starts from. A resumed run supersedes what a crashed attempt logged after its
    checkpoint: ``metrics.jsonl`` rows past it move aside (:func:`cut_after`), TensorBoard purges its events from
    ``start_step + 1`` on, and wandb resumes the same run (its id kept in the run directory) rewound to ``start_step``.
    """

    def __init__(self, cfg: Config, run_dir: Path, enabled: bool, start_step: int = 0, say=print):
        self.enabled = enabled
        self.max_scalars = cfg.logging.max_scalars
        self._jsonl = None
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        moved = cut_after(run_dir / "metrics.jsonl", start_step)
        if moved:
            say(f"metrics.jsonl: {moved} rows logged after step {start_step} (the checkpoint this run resumes from) "
                f"moved to {SUPERSEDED}; each step appears once")
        self._jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"),
                                     purge_step=start_step + 1 if start_step > 0 else None)
        if cfg.logging.wandb and cfg.logging.wandb_mode != "disabled":
            self._wandb = _wandb_run(cfg, run_dir, start_step)

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


def _wandb_run(cfg: Config, run_dir: Path, start_step: int):
    """The run directory's wandb run: created once (its id saved in ``wandb_run_id``), resumed by that id, and
    rewound to ``start_step`` after a crash (wandb's ``resume_from``) so its curves do not double back."""
    os.environ.setdefault("WANDB_MODE", cfg.logging.wandb_mode)
    import wandb

    id_file = run_dir / WANDB_ID
    if id_file.is_file():
        run_id = id_file.read_text().strip()
    else:
        run_id = wandb.util.generate_id()
        id_file.write_text(run_id + "\n")
    common = dict(project=cfg.logging.wandb_project, dir=str(run_dir), name=run_dir.name, config=cfg.to_dict())
    if start_step > 0 and os.environ.get("WANDB_MODE") == "online":
        try:
            return wandb.init(**common, resume_from=f"{run_id}?_step={start_step + 1}")
        except Exception as exc:  # noqa: BLE001 (a server without rewind: resume, and say that curves may repeat)
            print(f"note: wandb could not rewind run {run_id} to step {start_step} ({exc}); resuming it as it is")
    return wandb.init(**common, id=run_id, resume="allow")


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
