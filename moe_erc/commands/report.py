"""``moe-erc report RUN_DIR [RUN_DIR ...]``: figures and a Markdown summary from runs' ``metrics.jsonl``.

One run: its curves. Several runs (vanilla, ERC, AoE, K-Means, ...): curves overlaid and one comparison
table. Figures (PNG): loss (train and validation), ERC loss per layer, eps, the post-hoc ERC loss, MaxVio, and
the tokens-per-expert heat-map (layer x expert) of the latest log window of each run.

The comparison table (:func:`summary_table`) compares runs at one point, never at their last records: the
largest step at which every run has a validation record (by token count when the runs' tokens per step
differ), with the validation loss as the headline. Nothing is interpolated; the table says which step.
Train-side columns are means over the logged steps of the last tenth before that point, not one step's value.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from moe_erc.errors import UserError
from moe_erc.outputs import check_output_dir

# The post-hoc ERC loss at alpha=1 (clean router rows), mean over layers, as the trainer logs it on evaluation.
POSTHOC_ERC = "erc_loss_posthoc"


def read_records(metrics: Path) -> list[dict]:
    """The records of a ``metrics.jsonl``. A half-written last line (the run is still writing) is skipped;
    anything else that is not a JSON record, or no record at all, is a one-line error."""
    lines = metrics.read_text(errors="replace").splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                continue  # a running job's last line, not yet complete
            raise UserError(f"{metrics}: line {number} is not JSON; is this a metrics file written by "
                            f"moe-erc train?") from None
        if not isinstance(record, dict) or "step" not in record or "split" not in record:
            raise UserError(f"{metrics}: line {number} is not a moe-erc metrics record (no step/split)")
        records.append(record)
    if not records:
        raise UserError(f"{metrics} has no records yet; report a run once it has logged a step")
    return records


class Run:
    """One run directory: its name, config and metric records."""

    def __init__(self, path: Path):
        metrics = path / "metrics.jsonl"
        if not metrics.is_file():
            raise UserError(f"{path} has no metrics.jsonl; pass run directories written by moe-erc train")
        self.path, self.name = path, path.name
        self.records = read_records(metrics)
        config = path / "config.yaml"
        self.config = yaml.safe_load(config.read_text()) if config.is_file() else {}
        self._split_cache: dict[str, dict[int, dict]] = {}

    def _by_step(self, split: str) -> dict[int, dict]:
        """The records of one split by step; a later record of the same step (a resumed run repeats the
        steps after its last checkpoint) replaces the earlier one."""
        if split not in self._split_cache:
            rows: dict[int, dict] = {}
            for record in self.records:
                if record.get("split") == split:
                    rows[record["step"]] = record
            self._split_cache[split] = dict(sorted(rows.items()))
        return self._split_cache[split]

    def series(self, split: str, key: str) -> tuple[list[int], list]:
        """Steps and values of ``key`` in the records of ``split`` that have it."""
        rows = [(step, r.get(key)) for step, r in self._by_step(split).items()]
        rows = [(step, v) for step, v in rows if v is not None]
        return [step for step, _ in rows], [v for _, v in rows]

    def last(self, split: str, key):
        values = self.series(split, key)[1]
        return values[-1] if values else None

    def at(self, split: str, step: Optional[int], key: str):
        """``key`` of the record of ``split`` at exactly ``step`` (None when there is none)."""
        record = self._by_step(split).get(step) if step is not None else None
        return record.get(key) if record else None

    def window_mean(self, split: str, key: str, end: Optional[int]):
        """Mean of ``key`` over the logged steps in ``(end - max(1, end // 10), end]``."""
        if end is None:
            return None
        start = end - max(1, end // 10)
        steps, values = self.series(split, key)
        chosen = [v for s, v in zip(steps, values) if start < s <= end and isinstance(v, (int, float))]
        return sum(chosen) / len(chosen) if chosen else None

    def validated_steps(self) -> list[int]:
        return self.series("valid", "lm_loss")[0]

    @property
    def last_step(self) -> int:
        return max((r["step"] for r in self.records if "step" in r), default=0)

    @property
    def tokens_per_step(self) -> Optional[int]:
        batch = self.config.get("training", {}).get("global_batch_size")
        seq = self.config.get("model", {}).get("seq_length")
        return batch * seq if batch and seq else None

    @property
    def method(self) -> str:
        moe, erc = self.config.get("moe", {}), self.config.get("erc", {})
        router = moe.get("router", "topk")
        if router != "topk":
            return router
        if erc.get("enabled"):
            return f"ERC (alpha={erc.get('alpha')})"
        if moe.get("moe_router_enable_expert_bias"):
            return "aux-loss-free"
        return f"top-k ({moe.get('moe_router_load_balancing_type', 'aux_loss')})"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _line_figure(runs: list[Run], panels: list[tuple[str, str, str]], path: Path, title: str) -> Optional[Path]:
    """``panels``: (split, key, label). Returns the path, or None when no run has any of the keys."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = False
    for run in runs:
        for split, key, label in panels:
            steps, values = run.series(split, key)
            if steps:
                style = "-" if split == "train" else "o--"
                ax.plot(steps, values, style, label=f"{run.name} {label}" if len(runs) > 1 else label, ms=3)
                drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _per_layer_figure(run: Run, key: str, path: Path, title: str) -> Optional[Path]:
    steps, rows = run.series("train", key)
    if not steps:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for layer in range(len(rows[0])):
        values = [row[layer] if row[layer] is not None else math.nan for row in rows]
        if not all(math.isnan(v) for v in values):
            ax.plot(steps, values, label=f"layer {layer + 1}")
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _load_heatmap(run: Run, path: Path) -> Optional[Path]:
    table = run.last("train", "tokens_per_expert")
    if not table:
        return None
    rows = [(i + 1, row) for i, row in enumerate(table) if row]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(4, 0.35 * len(rows[0][1]) + 2), 0.5 * len(rows) + 1.5))
    image = ax.imshow([row for _, row in rows], aspect="auto", cmap="magma")
    ax.set_yticks(range(len(rows)), [str(layer) for layer, _ in rows])
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title(f"{run.name}: tokens per expert, last log window")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _fmt(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


@dataclass
class Alignment:
    """Where the runs are compared: ``steps[run name]`` (None: nowhere) and a sentence saying so."""

    steps: dict
    note: str


def align(runs: list[Run]) -> Alignment:
    """The largest step at which every run has a validation record (by tokens when the runs' tokens per step
    differ). Runs without validation records do not constrain it; nothing is interpolated."""
    per_step = {run.tokens_per_step for run in runs}
    by_tokens = None not in per_step and len(per_step) > 1
    unit = "tokens" if by_tokens else "step"

    def key(run: Run, step: int) -> int:
        return step * run.tokens_per_step if by_tokens else step

    same_tokens = next(iter(per_step)) if len(per_step) == 1 else None

    def describe(value: int) -> str:
        if by_tokens:
            return f"{value:,} tokens"
        return f"step {value}" + (f" ({value * same_tokens:,} tokens)" if same_tokens else "")

    validated = [run for run in runs if run.validated_steps()]
    unvalidated = [run.name for run in runs if not run.validated_steps()]
    extra = (f" {', '.join(unvalidated)}: no validation records (train columns at the same "
             f"{'token count' if by_tokens else 'step'})." if unvalidated else "")
    if not validated:
        end = min(key(run, run.last_step) for run in runs)
        steps = {run.name: end // run.tokens_per_step if by_tokens else end for run in runs}
        return Alignment(steps, f"No run has validation records; train columns at {describe(end)}, the largest "
                                f"{unit} every run reached.")
    common = set.intersection(*({key(run, s) for s in run.validated_steps()} for run in validated))
    reached = min(key(run, run.last_step) for run in runs)
    if common:
        point = max(common)
        steps = {run.name: point // run.tokens_per_step if by_tokens else point for run in runs}
        note = (f"Compared at {describe(point)}: the largest {unit} at which every run has a validation record "
                f"(validation loss is the headline); nothing is interpolated.")
        if point < reached:
            note += f" All runs reached {describe(reached)}, but were not all validated there."
        return Alignment(steps, note + extra)
    steps = {}
    for run in runs:
        own = [s for s in (run.validated_steps() or [run.last_step]) if key(run, s) <= reached]
        steps[run.name] = max(own) if own else None
    return Alignment(steps, f"No {unit} at which every run has a validation record: each run at its last "
                            f"validation at or before {describe(reached)} (see the step column); the runs are "
                            f"not aligned." + extra)


def summary_table(runs: list[Run]) -> list[str]:
    """The comparison table, with the sentence that says where the runs are compared above it."""
    alignment = align(runs)
    header = ["run", "method", "steps run", "compared at step", "tokens", "valid loss", "train loss (mean)",
              "MaxVio (valid)", "MaxVio (train, mean)", "coupling (valid)", "eps mean",
              "post-hoc ERC loss (alpha=1)", "ERC loss (train, mean)", "tokens/s (median)"]
    lines = [alignment.note, "",
             "Train columns: mean over the logged steps in (S - max(1, S // 10), S], S = the compared step (the "
             "last tenth of the run up to S, not one step's value). eps (mean noise bound) and the post-hoc ERC "
             "loss at alpha=1 (clean router rows, mean over layers): for runs that log them (methods with a router "
             "matrix), n/a otherwise.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        step = alignment.steps[run.name]
        speeds = [v for s, v in zip(*run.series("train", "tokens_per_s")) if step is None or s <= step]
        tokens = step * run.tokens_per_step if step is not None and run.tokens_per_step else None

        def weights_metric(key):  # a function of the weights at `step`: the validation record, else the train one
            value = run.at("valid", step, key)
            return value if value is not None else run.at("train", step, key)

        lines.append("| " + " | ".join([
            run.name, run.method, str(run.last_step), _fmt(step), f"{tokens:,}" if tokens is not None else "n/a",
            _fmt(run.at("valid", step, "lm_loss")), _fmt(run.window_mean("train", "lm_loss", step)),
            _fmt(run.at("valid", step, "maxvio_global"), 3), _fmt(run.window_mean("train", "maxvio", step), 3),
            _fmt(run.at("valid", step, "coupling"), 3), _fmt(weights_metric("eps_mean"), 3),
            _fmt(weights_metric(POSTHOC_ERC), 3), _fmt(run.window_mean("train", "erc_loss", step), 3),
            _fmt(statistics.median(speeds) if speeds else None, 5)]) + " |")
    return lines


def downstream_table(runs: list[Run]) -> list[str]:
    """``moe-erc eval`` results (each run's newest ``eval/step_*.json``): one column per task, or nothing."""
    from moe_erc.commands.evaluate import latest_scores

    scores = {run.name: latest_scores(run.path) for run in runs}
    columns = sorted({c for s in scores.values() for c in s})
    if not columns:
        return []
    lines = ["## Downstream (lm-evaluation-harness, `moe-erc eval`; the newest evaluated checkpoint of each run)", "",
             "| run | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 1)]
    for run in runs:
        lines.append(f"| {run.name} | " + " | ".join(_fmt(scores[run.name].get(c)) for c in columns) + " |")
    return [*lines, ""]


def write_report(run_dirs: list[str], out_dir: Optional[str] = None) -> Path:
    runs = [Run(Path(d)) for d in run_dirs]
    out = Path(out_dir) if out_dir else (runs[0].path / "report" if len(runs) == 1 else Path("report"))
    out.mkdir(parents=True, exist_ok=True)
    figures: list[tuple[str, Optional[Path]]] = [
        ("Loss", _line_figure(runs, [("train", "lm_loss", "train"), ("valid", "lm_loss", "valid")],
                              out / "loss.png", "LM loss")),
        ("Noise bound eps (mean over experts and layers)",
         _line_figure(runs, [("train", "eps_mean", "eps"), ("valid", "eps_mean", "eps (eval)")], out / "eps.png",
                      "eps (larger = more specialised)")),
        ("Post-hoc ERC loss at alpha=1 (evaluation, mean over layers)",
         _line_figure(runs, [("valid", POSTHOC_ERC, "post-hoc ERC loss")], out / "erc_posthoc.png",
                      "ERC loss at alpha=1, clean router rows (0 = coupled)")),
        ("MaxVio", _line_figure(runs, [("train", "maxvio", "batch"), ("valid", "maxvio_global", "valid")],
                                out / "maxvio.png", "MaxVio = (max load - mean) / mean")),
        ("Router-expert coupling (validation)",
         _line_figure(runs, [("valid", "coupling", "coupling")], out / "coupling.png", "coupling score")),
    ]
    for run in runs:
        prefix = f"{run.name}_" if len(runs) > 1 else ""
        figures.append((f"ERC loss per layer ({run.name})",
                        _per_layer_figure(run, "erc_loss_per_layer", out / f"{prefix}erc_per_layer.png",
                                          f"{run.name}: ERC loss per layer")))
        figures.append((f"Tokens per expert ({run.name})", _load_heatmap(run, out / f"{prefix}load.png")))
    lines = ["# moe-erc report", "", *summary_table(runs), "", *downstream_table(runs)]
    for title, path in figures:
        if path is not None:
            lines += [f"## {title}", "", f"![{title}]({path.name})", ""]
    for run in runs:
        lines += [f"## Config: {run.name}", "", "```yaml", yaml.safe_dump(run.config, sort_keys=False).strip(),
                  "```", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="moe-erc report", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", help="one or more run directories (logging.run_dir)")
    parser.add_argument("--out", default=None, help="output directory (default: RUN_DIR/report, or ./report)")
    args = parser.parse_args(argv)
    if args.out:
        check_output_dir(args.out)
    report = write_report(args.run_dirs, args.out)
    print(f"wrote {report} and {len(list(report.parent.glob('*.png')))} figures in {report.parent}")
    return 0
