"""`moe-erc study` end to end on the tiny model: runs, resumes, analyses, writes the report and figures."""

import subprocess
import sys

from launch import REPO, TINY

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_study_writes_claims_tables_and_figures_and_skips_finished_runs(tiny_corpus, tmp_path):
    cmd = [sys.executable, "-m", "moe_erc", "study", "--config", str(REPO / "configs" / "study.yaml"), "--methods", "vanilla,erc-1,aoe", "--seeds", "1",
           "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "study"), "--set", *TINY,
           f"data.data_path={tiny_corpus}", "training.train_iters=3", "training.eval_interval=3",
           "checkpoint.save_interval=3"]
    first = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.count("study: training") == 3
    readme = (tmp_path / "study" / "README.md").read_text()
    for label in ("| vanilla (aux loss 0.01) |", "| ERC alpha=1 |", "| AoE | "):
        assert label in readme
    assert "n/a (no router matrix)" in readme  # AoE has no router rows to analyse
    for claim in ("(a) ERC (alpha=1)", "(c) ERC's validation loss", "(d) AoE costs more per token"):
        assert claim in readme
    figures = sorted((tmp_path / "study").glob("*.png"))
    assert {f.name for f in figures} >= {"valid_loss.png", "posthoc_erc_and_eps.png", "maxvio.png",
                                          "flops_per_token.png", "M_vanilla.png", "M_erc-1.png"}
    assert all(f.read_bytes().startswith(PNG_MAGIC) for f in figures)
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert again.returncode == 0 and again.stdout.count("already finished, skipped") == 3
