"""`moe-erc eval`: lm-evaluation-harness on a checkpoint, offline, from a local task; `moe-erc report` shows it."""

import json
from pathlib import Path

import pytest
import torch

from launch import cli, train

pytest.importorskip("lm_eval")  # installed by scripts/test.sh (MOE_ERC_EXTRAS=eval)

DOCS = [("To be, or not to", [" be", " cat", " seven"], 0), ("My lord, I", [" will", " blue", " the"], 0),
        ("What is your", [" name", " of", " and"], 2), ("Good morrow,", [" sir", " good", " lord"], 1),
        ("Enter the", [" King", " Duke", " Queen"], 0), ("I am", [" not", " a", " the"], 1)]


def task_dir(tmp_path: Path) -> Path:
    """A multiple-choice task lm-eval reads from a local JSONL (no hub)."""
    from moe_erc.commands.evaluate import write_choice_task

    return write_choice_task(tmp_path / "tasks", "tiny_mc", DOCS)


def accuracy_by_hand(checkpoint: Path, tokenizer_file: str) -> float:
    """Each choice's log-likelihood given the question from moe-erc's own forward (not the export lm-eval runs),
    split as lm-eval splits it (encode(question + choice) after encode(question)); the argmax against the answer."""
    from tokenizers import Tokenizer

    from moe_erc.training.checkpoint import one_process_model

    tok = Tokenizer.from_file(tokenizer_file)
    right = 0
    with one_process_model(str(checkpoint)) as (_cfg, net, _meta), torch.no_grad():
        for question, choices, answer in DOCS:
            scores = []
            for choice in choices:
                ctx, whole = tok.encode(question).ids, tok.encode(question + choice).ids
                ids = torch.tensor([whole])
                logp = net(ids, torch.arange(len(whole))[None], None).float().log_softmax(-1)[0]
                scores.append(sum(logp[i - 1, whole[i]].item() for i in range(len(ctx), len(whole))))
            right += int(max(range(len(choices)), key=scores.__getitem__) == answer)
    return right / len(DOCS)


def test_eval_writes_lm_evals_accuracy_into_the_run_and_report_shows_it(tiny_corpus, tmp_path):
    run = tmp_path / "run"
    train(run, tiny_corpus, "training.train_iters=3", "optimizer.lr=3e-3")
    tasks = task_dir(tmp_path)
    proc = cli("eval", str(run / "checkpoints"), "--tasks", "tiny_mc", "--include-path", str(tasks),
               env={"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((run / "eval" / "step_0000003.json").read_text())
    acc = result["results"]["tiny_mc"]["acc,none"]
    assert result["n-samples"]["tiny_mc"]["effective"] == len(DOCS)
    assert acc == pytest.approx(accuracy_by_hand(run / "checkpoints", f"{tiny_corpus}.tokenizer.json"))
    assert f"| tiny_mc | acc | {acc:.4f} |" in (run / "eval" / "step_0000003.md").read_text()
    proc = cli("report", str(run), "--out", str(tmp_path / "report"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| run | tiny_mc acc |" in report and f"| run | {acc:.4f} |" in report
    proc = cli("eval", str(run / "checkpoints"), "--tasks", "no_such_task", "--include-path", str(tasks))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "unknown lm-eval task(s) no_such_task" in proc.stderr
