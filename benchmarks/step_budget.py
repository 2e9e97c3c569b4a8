"""Kernel launches and host syncs of one training step, counted on CPU.

    python benchmarks/step_budget.py                          # every variant at the scaled-down 3B shapes
    python benchmarks/step_budget.py --variants erc --optimizer symmetric
    python benchmarks/step_budget.py --config configs/tiny-erc.yaml training.micro_batch_size=2
    python benchmarks/step_budget.py --json out.json

Without ``--config`` it counts the scaled-down 3B shapes of :func:`moe_erc.commands.budget.budget_overrides` (4 layers,
d=256, 64 experts top-8, expert width 128, seq 256, bf16, 2 micro-batches, grouped experts) for each
variant; with ``--config`` it counts that config (plus overrides) as it is, on CPU, on a non-logging step.
How the counts are taken and what counts as a sync: :mod:`moe_erc.commands.budget`. ``tests/commands/test_step_budget.py``
holds the budgets.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="a YAML config to count as it is (default: the scaled-down 3B shapes)")
    parser.add_argument("--variants", default="vanilla,erc,aoe,kmeans,auxfree,deepseek",
                        help="comma-separated, of: vanilla, erc, aoe, kmeans, auxfree (without --config)")
    parser.add_argument("--optimizer", default="adamw", help="adamw | muon | symmetric | a comma-separated list")
    parser.add_argument("--data", help="a tokenized data prefix (default: the embedded corpus)")
    parser.add_argument("--warmup", type=int, default=2, help="steps run before the counted one")
    parser.add_argument("--json", help="also write the counts to this JSON file")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)

    from moe_erc.commands.budget import VARIANTS, budget_overrides, count_step, format_table, scratch_dir
    from moe_erc.config import load_config

    scratch = scratch_dir()
    counts = []
    try:
        optimizers = [o for o in args.optimizer.split(",") if o]
        if args.config:
            runs = [(Path(args.config).stem, [])]
        else:
            unknown = [v for v in args.variants.split(",") if v and v not in VARIANTS]
            if unknown:
                parser.error(f"unknown variant(s) {unknown}; choose from {sorted(VARIANTS)}")
            runs = [(v, VARIANTS[v]) for v in args.variants.split(",") if v]
        for name, extra in runs:
            for optimizer in optimizers:
                run_dir = str(Path(scratch) / f"{name}-{optimizer}")
                base = [f"logging.run_dir={run_dir}", "training.device=cpu", "training.resume=none"] \
                    if args.config else budget_overrides(run_dir, args.data)
                if args.config and args.data:
                    base.append(f"data.data_path={args.data}")
                cfg = load_config(args.config, base + extra + [f"optimizer.name={optimizer}"] + args.overrides)
                counts.append(count_step(cfg, warmup=args.warmup, label=f"{name}/{optimizer}"))
                print(f"counted {name}/{optimizer}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(format_table(counts))
    if args.json:
        Path(args.json).write_text(json.dumps([c.as_dict() for c in counts], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
