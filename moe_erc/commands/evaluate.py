"""``moe-erc eval CHECKPOINT --tasks ...``: downstream accuracy with lm-evaluation-harness.

The checkpoint is exported to a temporary transformers directory (``moe-erc export``; ``--hf-dir`` reuses one) and
lm-evaluation-harness's Python API (``lm_eval.simple_evaluate``, its ``hf`` model) runs the tasks on it. Results go
to ``RUN_DIR/eval/step_XXXXXXX.{json,md}`` (``--out`` elsewhere): the JSON keeps lm-eval's ``results``,
``n-samples``, ``versions`` and ``configs``; the Markdown table has one row per task and metric. ``moe-erc report``
shows a column per task when runs have them.

Offline: tasks are found by name in lm-eval's registry or in ``--include-path`` (a directory of task YAMLs); a task
whose ``dataset_path`` is ``json`` with local ``data_files`` needs no hub. The paper's benchmarks (MMLU, ARC-Easy /
Challenge, HellaSwag, PIQA, WinoGrande, ...) are lm-eval task names for machines with the hub (docs/import.md).
lm-eval is an optional extra: ``pip install -e '.[eval]'`` (scripts/test.sh installs it).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from moe_erc.errors import ConfigError, UserError


def _lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval import simple_evaluate
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ConfigError("moe-erc eval needs lm-evaluation-harness: pip install -e '.[eval]' "
                          "(lm-eval[hf]==0.4.13)") from None
    return simple_evaluate, TaskManager


def write_choice_task(directory: str | Path, name: str, docs: list[tuple[str, list[str], int]]) -> Path:
    """A local multiple-choice lm-eval task: ``directory/{name}.jsonl`` with ``(question, choices, answer index)``
    rows and ``directory/{name}.yaml`` reading it (``dataset_path: json``, no hub). Returns ``directory``, the
    ``--include-path``; accuracy is the argmax of each choice's log-likelihood after the question."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / f"{name}.jsonl", "w") as f:
        for question, choices, answer in docs:
            f.write(json.dumps({"question": question, "choices": choices, "answer": answer}) + "\n")
    (directory / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {(directory / f'{name}.jsonl').resolve()}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    return directory


def run_dir_of(step_dir: Path) -> Path:
    """The run directory a checkpoint belongs to (``RUN/checkpoints/step_N`` -> ``RUN``), else its parent."""
    return step_dir.parent.parent if step_dir.parent.name == "checkpoints" else step_dir.parent


def table(results: dict) -> list[str]:
    """Markdown rows ``| task | metric | value | stderr |`` from lm-eval's ``results``."""
    rows = ["| task | metric | value | stderr |", "|---|---|---|---|"]
    for task, metrics in sorted(results.items()):
        for key, value in metrics.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            err = f"{stderr:.4f}" if isinstance(stderr, (int, float)) else "n/a"
            rows.append(f"| {task} | {metric}{'' if filt == 'none' else f' ({filt})'} | {value:.4f} | {err} |")
    return rows


def evaluate(checkpoint: str, tasks: list[str], include_path: str | None = None, limit: int | None = None,
             batch_size: int = 8, hf_dir: str | None = None, out: str | None = None, device: str = "cpu") -> dict:
    """Run lm-eval on the checkpoint; returns ``{"json", "md", "results"}``."""
    from moe_erc.commands.export import export
    from moe_erc.training import checkpoint as ckpt

    simple_evaluate, TaskManager = _lm_eval()
    if include_path and not Path(include_path).is_dir():
        raise UserError(f"--include-path {include_path} is not a directory of task YAML files")
    step_dir = ckpt.resolve(checkpoint)
    step = ckpt.read_metadata(step_dir).get("step", 0)
    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UserError(f"unknown lm-eval task(s) {', '.join(unknown)}; pass --include-path DIR for your own task "
                        f"YAMLs, or see `lm-eval ls tasks`")
    with tempfile.TemporaryDirectory(prefix="moe-erc-eval-") as tmp:
        model_dir = hf_dir or str(Path(tmp) / "hf")
        if hf_dir is None:
            export(str(step_dir), model_dir)
        output = simple_evaluate(model="hf", model_args={"pretrained": model_dir, "dtype": "float32",
                                                         "device": device},
                                 tasks=tasks, task_manager=manager, limit=limit, batch_size=batch_size,
                                 log_samples=False)
    keep = {k: output[k] for k in ("results", "n-samples", "versions", "configs", "n-shot") if k in output}
    keep["checkpoint"], keep["step"], keep["lm_eval_version"] = str(step_dir), step, output.get("lm_eval_version")
    out_dir = Path(out) if out else run_dir_of(step_dir) / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    name = ckpt.step_dir_name(step)
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    json_path.write_text(json.dumps(keep, indent=1, default=str))
    md_path.write_text("\n".join([f"# lm-evaluation-harness, {step_dir} (step {step})", "", *table(output["results"]),
                                  ""]))
    return {"json": str(json_path), "md": str(md_path), "results": output["results"]}


def latest_scores(run_dir: Path) -> dict[str, float]:
    """``{task: value}`` of each task's first metric in the run's newest ``eval/step_*.json`` (empty if none)."""
    files = sorted((run_dir / "eval").glob("step_*.json"))
    if not files:
        return {}
    results = json.loads(files[-1].read_text()).get("results", {})
    scores = {}
    for task, metrics in sorted(results.items()):
        for key, value in metrics.items():
            if "," in key and "_stderr" not in key and isinstance(value, (int, float)):
                scores[f"{task} {key.split(',')[0]}"] = float(value)
                break
    return scores


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="moe-erc eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a checkpoint directory (step_XXXXXXX or its parent)")
    parser.add_argument("--tasks", required=True, help="comma list of lm-eval task names")
    parser.add_argument("--include-path", default=None, help="a directory of your own task YAMLs")
    parser.add_argument("--limit", type=int, default=None, help="at most this many examples per task")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--hf-dir", default=None, help="reuse this exported transformers directory")
    parser.add_argument("--out", default=None, help="where the JSON and table go (default RUN_DIR/eval)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise UserError("--tasks names no task, e.g. --tasks arc_easy,hellaswag")
    result = evaluate(args.checkpoint, tasks, args.include_path, args.limit, args.batch_size, args.hf_dir, args.out,
                      args.device)
    print("\n".join(table(result["results"])))
    print(f"eval: wrote {result['json']} and {result['md']}")
    return 0
