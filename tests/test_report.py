"""`moe-erc report` and `moe-erc analyze` on real short runs."""

import json
import subprocess
import sys

import pytest

from launch import train

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def erc_run(tiny_corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("report") / "erc"
    train(run_dir, tiny_corpus, "training.train_iters=6", "erc.enabled=true", "erc.alpha=0.5",
          "training.eval_interval=3", "logging.routing_trace=true", "logging.trace_interval=2")
    return run_dir


def _cli(*args, cwd):
    proc = subprocess.run([sys.executable, "-m", "moe_erc", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_report_writes_figures_and_markdown_that_references_them(erc_run, tiny_corpus, tmp_path):
    vanilla = tmp_path / "vanilla"
    train(vanilla, tiny_corpus, "training.train_iters=3")
    out = tmp_path / "report"
    _cli("report", str(erc_run), str(vanilla), "--out", str(out), cwd=tmp_path)
    markdown = (out / "report.md").read_text()
    figures = sorted(p.name for p in out.glob("*.png"))
    assert {"loss.png", "maxvio.png", "eps.png", "erc_erc_per_layer.png", "erc_load.png"} <= set(figures)
    for name in figures:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 2000
        assert f"]({name})" in markdown
    assert "| erc | ERC (alpha=0.5) | 6 |" in markdown and "| vanilla | top-k (aux_loss) | 3 |" in markdown


def test_training_logged_the_instruments_and_a_routing_trace(erc_run):
    records = [json.loads(line) for line in (erc_run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in records if r["split"] == "train"]
    valid_rows = [r for r in records if r["split"] == "valid"]
    last = train_rows[-1]
    assert len(last["tokens_per_expert"]) == 2 and len(last["tokens_per_expert"][0]) == 4
    assert sum(last["tokens_per_expert"][0]) == 8 * 64 * 2  # batch tokens x top-2 over the log window
    assert last["maxvio"] >= 0 and last["dead_experts"] >= 0 and 0 <= last["router_cosine"] <= 1
    assert all(-1 <= v <= 1 for v in valid_rows[-1]["coupling_per_layer"])
    trace = [json.loads(line) for line in (erc_run / "routing_trace.jsonl").read_text().splitlines()]
    assert {row["step"] for row in trace} == {0, 2, 4} and {row["layer"] for row in trace} == {1, 2}
    assert all(len(experts) == 2 for row in trace for experts in row["experts"])
    assert all(len(row["token_ids"]) == len(row["experts"]) for row in trace)


def test_analyze_is_the_same_for_a_checkpoint_saved_with_ep2(erc_run, tiny_corpus, tmp_path):
    """Same weights saved under EP=2 (one step at lr 0) and under one process: identical analysis."""
    ep2 = tmp_path / "ep2"
    train(ep2, tiny_corpus, "training.train_iters=1", "optimizer.lr=0", "optimizer.min_lr=0",
          "erc.enabled=true", f"checkpoint.load={erc_run / 'checkpoints'}",
          "parallel.expert_model_parallel_size=2", nproc=2)
    one = json.loads(_cli("analyze", str(erc_run / "checkpoints"), "--json", "--alphas", "0.5,1,2",
                          cwd=tmp_path).strip().splitlines()[-1])
    two = json.loads(_cli("analyze", str(ep2 / "checkpoints"), "--json", "--alphas", "0.5,1,2",
                          cwd=tmp_path).strip().splitlines()[-1])
    assert one["layers"].keys() == two["layers"].keys() == {"1", "2"}
    for layer in one["layers"]:
        a, b = one["layers"][layer], two["layers"][layer]
        for key in ("eps_mean", "margin", "router_norm_mean", "gate_norm_mean", "gate_norm_std"):
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), (layer, key)
        for alpha in ("0.5", "1.0", "2.0"):
            assert b["erc_loss"][alpha] == pytest.approx(a["erc_loss"][alpha], rel=1e-6, abs=1e-9)
    assert (erc_run / "checkpoints" / "step_0000006" / "analysis" / "M_step6.png").read_bytes().startswith(PNG_MAGIC)
