"""Every command line in README.md runs as written, with a tiny step count.

Each line of the README's ``bash`` blocks runs in bash, in a scratch directory laid out like the repository
(``configs/``, ``scripts/``, ``.venv`` linked), with ``moe-erc``, ``torchrun``, ``python`` and the other
entry points replaced by shell functions that record their arguments: loops, globs and the demo/test
scripts expand as they would for a user. The recorded ``moe-erc`` calls then run in this process (imports
paid once) with overrides that shrink the step count only; ``torchrun`` lines get the launcher's layout
check for their process count (the 2-process layouts themselves are trained in tests/training/test_training.py).
A README line this test does not know how to run fails it, so a new example cannot go untested.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from launch import REPO, TINY

# Appended to every in-process `moe-erc train`: fewer steps and a smaller batch. Nothing else of the README's
# command changes (the embedded corpus is prepared in the scratch directory as for a user, ~4 s).
SHRINK_TRAIN = ["training.train_iters=2", "training.eval_interval=2", "training.eval_iters=1",
                "checkpoint.save_interval=2", "logging.log_interval=1", "logging.progress=false",
                "training.micro_batch_size=4", "training.global_batch_size=4"]
# `study --quick` trains every method in a process of its own (8 x ~10 s of start-up here): three methods
# (a router matrix, ERC, no router matrix) on the tests' tiny model; its report is checked below.
STUDY_METHODS = ["--methods", "vanilla,erc-1,aoe"]
SHRINK_STUDY = [*TINY, *SHRINK_TRAIN, "data.split=969,30,1", "training.eval_interval=2"]

# Lines that cannot run on a CPU test machine, each with the reason; everything else must run.
NOT_RUN = {
    "moe-erc study": "the full 2-hour study; `moe-erc study --quick` above runs the same code with one seed",
    "moe-erc study --kmeans-ablation": "27 runs of the study model; tests/commands/test_study.py checks its report on "
                                       "synthetic results and tests/model/test_kmeans.py each option",
    "moe-erc study --optimizer-ablation": "13 runs of the study model; tests/commands/test_study.py checks its verdicts on "
                                          "synthetic results, tests/training/test_optimizer_training.py trains the preset",
    "moe-erc import": "needs a Hugging Face model directory; tests/commands/test_import.py imports and upcycles random models "
                      "of every supported class",
    "moe-erc train runs/imported/config.yaml": "trains from the import above on the user's data (MY_PREFIX); "
                                               "tests/commands/test_import.py trains an imported model under three layouts",
    "moe-erc eval": "arc_easy / hellaswag download their datasets; tests/commands/test_eval.py runs a local task offline",
    "sbatch": "needs SLURM; tests/test_launchers.py runs the batch script's launch line",
    "lm_eval": "lm-evaluation-harness is not a test dependency here",
    "pip install -e .": "installs into the environment; scripts/setup_env.sh does the same for these tests",
    "scripts/test.sh --gpu": "the GPU tier: needs a CUDA build of torch and a GPU",
    "python benchmarks/gpu_step.py": "needs a GPU",
}

_ENTRY_POINTS = ("moe-erc", "torchrun", "sbatch", "lm_eval", "pip", "python")


def readme_commands(text: str) -> list[str]:
    """The command lines of README.md's ``bash`` blocks: continuations joined, comments and blanks dropped."""
    lines: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                lines.append(" ".join(line.split()))
    return lines


def _sandbox(root: Path) -> Path:
    """A directory that looks like a checkout to the README's relative paths; nothing is written to the repo."""
    for name in ("configs", "scripts", "benchmarks", "pyproject.toml", ".venv"):
        (root / name).symlink_to(REPO / name)
    corpus = root / "corpus"
    corpus.mkdir()
    from moe_erc.data.corpus import embedded_corpus_files

    import json

    for i, play in enumerate(embedded_corpus_files()[:2]):
        text = play.read_text()
        with open(corpus / f"part{i}.jsonl", "w") as f:
            for j in range(0, len(text), 4000):
                f.write(json.dumps({"text": text[j:j + 4000]}) + "\n")
    return root


def _record(line: str, cwd: Path) -> list[list[str]]:
    """Run ``line`` in bash with the entry points recorded instead of run; return each call's argv."""
    calls = cwd / ".calls"
    calls.write_text("")
    stubs = "\n".join(f"{name}() {{ _rec {name} \"$@\"; }}; export -f {name}" for name in _ENTRY_POINTS)
    script = (f"_rec() {{ local IFS=$'\\x1f'; printf '%s\\n' \"$*\" >> {shlex.quote(str(calls))}; }}\n"
              f"export -f _rec\n{stubs}\nset -e\n{line}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV",)}
    proc = subprocess.run(["bash", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"README line failed in bash: {line}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return [entry.split("\x1f") for entry in calls.read_text().splitlines()]


def _not_run_reason(call: list[str]) -> str | None:
    text = " ".join(call)
    for prefix, reason in sorted(NOT_RUN.items(), key=lambda item: -len(item[0])):  # the longest prefix wins
        if text == prefix or text.startswith(prefix + " "):
            if prefix == "moe-erc study" and "--quick" in call:
                return None
            return reason
    return None


def _run_moe_erc(args: list[str]) -> list[str]:
    from moe_erc.cli import main

    command = args[0]
    if command == "train":
        args = [*args, *SHRINK_TRAIN]
    elif command == "study":
        args = [*args, *STUDY_METHODS, "--set", *SHRINK_STUDY]
    rc = main(args)
    assert rc == 0, f"moe-erc {' '.join(args)} exited with {rc}"
    return args


def _check_torchrun(args: list[str]) -> None:
    """``torchrun --nproc-per-node N -m moe_erc.train CONFIG overrides``: the config loads and its layout fits N."""
    from moe_erc.config import check_layout, load_config

    nproc = int(next(a.split("=", 1)[1] if "=" in a else args[i + 1]
                     for i, a in enumerate(args) if a.startswith("--nproc-per-node")))
    module = args.index("-m")
    assert args[module + 1] == "moe_erc.train", args
    config, *overrides = args[module + 2:]
    check_layout(load_config(config, overrides), nproc, device="cpu")


def test_readme_commands_run_as_written(tmp_path, monkeypatch, capsys):
    if not (REPO / ".venv" / "bin" / "python").exists():
        pytest.skip("runs scripts/demo.sh and scripts/test.sh, which need the repository's .venv (scripts/test.sh)")
    sandbox = _sandbox(tmp_path)
    monkeypatch.chdir(sandbox)
    lines = readme_commands((REPO / "README.md").read_text())
    assert "scripts/demo.sh" in lines and "scripts/test.sh" in lines, lines[:3]
    ran, skipped, study_args = [], [], None
    for line in lines:
        if _not_run_reason(line.split()):
            skipped.append(line)
            continue
        for call in _record(line, sandbox):
            reason = _not_run_reason(call)
            if reason:
                skipped.append(" ".join(call))
            elif call[0] == "moe-erc":
                args = _run_moe_erc(call[1:])
                ran.append(" ".join(call))
                if args[0] == "study":
                    study_args = args
            elif call[0] == "torchrun":
                _check_torchrun(call[1:])
                ran.append(" ".join(call))
            elif call[:4] == ["python", "-m", "pytest", "tests"]:
                ran.append(" ".join(call))  # scripts/test.sh reached the suite (this test is part of it)
            else:
                raise AssertionError(f"README line {line!r} calls {call}, which this test does not know how to run")
    # What the README's examples promise on disk, after running them.
    assert (sandbox / "runs" / "tiny" / "metrics.jsonl").exists()
    assert (sandbox / "data" / "mycorpus_text_document.idx").exists()
    assert (sandbox / "report" / "report.md").exists()
    assert (sandbox / "runs" / "tiny" / "report" / "report.md").exists()
    assert (sandbox / "hf" / "tiny" / "config.json").exists()
    assert {_not_run_reason(line.split()) for line in skipped} == set(NOT_RUN.values()), skipped  # none stale
    _check_study(sandbox / "runs" / "study-quick" / "report", study_args, capsys)


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _check_study(out: Path, study_args: list[str], capsys) -> None:
    """`moe-erc study --quick` wrote the claims, tables and figures; run again, it skips its finished runs."""
    from moe_erc.cli import main

    readme = (out / "README.md").read_text()
    for label in ("| vanilla (aux loss 0.01) |", "| ERC alpha=1 |", "| AoE | "):
        assert label in readme
    assert "n/a (no router matrix)" in readme  # AoE has no router rows to analyse
    for claim in ("(a) ERC (alpha=1)", "(c) ERC's validation loss", "(d) AoE costs more per token"):
        assert claim in readme
    figures = sorted(out.glob("*.png"))
    assert {f.name for f in figures} >= {"valid_loss.png", "posthoc_erc_and_eps.png", "maxvio.png",
                                          "flops_per_token.png", "M_vanilla.png", "M_erc-1.png"}
    assert all(f.read_bytes().startswith(PNG_MAGIC) for f in figures)
    capsys.readouterr()
    assert main([*study_args, "--out", str(out.parent / "report-again")]) == 0
    assert capsys.readouterr().out.count("already finished, skipped") == 3
