"""``moe-erc report RUN_DIR [RUN_DIR ...]``: figures and a Markdown summary from runs' ``metrics.jsonl``.

One run: its curves. Several runs (vanilla, ERC, AoE, K-Means, ...): curves overlaid and one comparison
table. Figures (PNG): loss (train and validation), ERC loss per layer, eps, MaxVio, and the tokens-per-expert
heat-map (layer x expert) of the latest log window of each run.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Optional

import yaml

from moe_erc.errors import UserError


class Run:
    """One run directory: its name, config and metric records."""

    def __init__(self, path: Path):
        metrics = path / "metrics.jsonl"
        if not metrics.is_file():
            raise UserError(f"{path} has no metrics.jsonl; pass run directories written by moe-erc train")
        self.path, self.name = path, path.name
        self.records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        config = path / "config.yaml"
        self.config = yaml.safe_load(config.read_text()) if config.is_file() else {}

    def series(self, split: str, key: str) -> tuple[list[int], list]:
        rows = [r for r in self.records if r["split"] == split and r.get(key) is not None]
        return [r["step"] for r in rows], [r[key] for r in rows]

    def last(self, split: str, key: str):
        values = self.series(split, key)[1]
        return values[-1] if values else None

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
        return "–"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def summary_table(runs: list[Run]) -> list[str]:
    header = ["run", "method", "steps", "final train loss", "final valid loss", "tokens/s (median)",
              "MaxVio (batch)", "MaxVio (valid)", "coupling", "ERC loss", "eps mean"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        speeds = run.series("train", "tokens_per_s")[1]
        steps = run.series("train", "lm_loss")[0]
        lines.append("| " + " | ".join([
            run.name, run.method, str(steps[-1] if steps else 0), _fmt(run.last("train", "lm_loss")),
            _fmt(run.last("valid", "lm_loss")), _fmt(statistics.median(speeds) if speeds else None, 5),
            _fmt(run.last("train", "maxvio"), 3), _fmt(run.last("valid", "maxvio_global"), 3),
            _fmt(run.last("valid", "coupling"), 3), _fmt(run.last("train", "erc_loss"), 3),
            _fmt(run.last("train", "eps_mean"), 3)]) + " |")
    return lines


def write_report(run_dirs: list[str], out_dir: Optional[str] = None) -> Path:
    runs = [Run(Path(d)) for d in run_dirs]
    out = Path(out_dir) if out_dir else (runs[0].path / "report" if len(runs) == 1 else Path("report"))
    out.mkdir(parents=True, exist_ok=True)
    figures: list[tuple[str, Optional[Path]]] = [
        ("Loss", _line_figure(runs, [("train", "lm_loss", "train"), ("valid", "lm_loss", "valid")],
                              out / "loss.png", "LM loss")),
        ("Noise bound eps (mean over experts and layers)",
         _line_figure(runs, [("train", "eps_mean", "eps")], out / "eps.png", "eps (larger = more specialised)")),
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
    lines = ["# moe-erc report", "", *summary_table(runs), ""]
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
    report = write_report(args.run_dirs, args.out)
    print(f"wrote {report} and {len(list(report.parent.glob('*.png')))} figures in {report.parent}")
    return 0
