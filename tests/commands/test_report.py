"""`moe-erc report` and `moe-erc analyze` on real short runs, and the report's comparison table on
hand-written metrics."""

import json

import pytest
import yaml

from launch import cli, records, train

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def erc_run(tiny_corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("report") / "erc"
    train(run_dir, tiny_corpus, "training.train_iters=6", "erc.enabled=true", "erc.alpha=0.5",
          "training.eval_interval=3", "logging.routing_trace=true", "logging.trace_interval=2")
    return run_dir


def _cli(*args, cwd):
    proc = cli(*args, cwd=cwd)
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
    # Both compared at step 3: the vanilla run's last validation, the ERC run's second (it ran to 6).
    assert "| erc | ERC (alpha=0.5) | 6 | 3 |" in markdown and "| vanilla | top-k (aux_loss) | 3 | 3 |" in markdown
    assert "Compared at step 3 (1,536 tokens)" in markdown
    rows = _rows(markdown)
    for name, run_dir in (("erc", erc_run), ("vanilla", vanilla)):
        (at_3,) = [r for r in records(run_dir, "valid") if r["step"] == 3]
        assert float(rows[name]["valid loss"]) == pytest.approx(at_3["lm_loss"], rel=1e-3)
        # eps and the post-hoc ERC loss are logged on evaluation for vanilla as for ERC
        assert float(rows[name]["eps mean"]) == pytest.approx(at_3["eps_mean"], rel=2e-3, abs=1e-3)
        assert float(rows[name]["post-hoc ERC loss (alpha=1)"]) == pytest.approx(at_3["erc_loss_posthoc"], rel=2e-3,
                                                                                 abs=1e-3)


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


# ---------------------------------------------------------------------------------------------- the table


def _write_run(path, config, metrics):
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
    return path


def _config(router="topk", erc=False, batch=8, seq=64):
    return {"model": {"seq_length": seq}, "training": {"global_batch_size": batch},
            "moe": {"router": router, "moe_router_load_balancing_type": "aux_loss"},
            "erc": {"enabled": erc, "alpha": 1.0}}


def _train(step, loss, **extra):
    return {"step": step, "split": "train", "lm_loss": loss, "maxvio": 0.1 * step, "tokens_per_s": 1000.0 + step,
            **extra}


def _valid(step, loss, **extra):
    return {"step": step, "split": "valid", "lm_loss": loss, "maxvio_global": 0.01 * step,
            "coupling": 0.5 + 0.01 * step,
            **extra}


def _rows(markdown):
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| run |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header, cells))
    return rows


def test_report_compares_runs_of_different_lengths_at_their_common_validated_step(tmp_path):
    """An ERC run of 20 steps and a vanilla run of 12 (validation every 4 steps, and at the end): the table
    holds each run's records at step 12, the largest step both validated, not their last records."""
    erc_records = [_valid(0, 9.0, eps_mean=0.01, erc_loss_posthoc=0.9)]
    for step in range(1, 21):
        erc_records.append(_train(step, 10.0 - 0.2 * step, erc_loss=0.05 * step, eps_mean=0.001 * step))
        if step % 4 == 0:
            erc_records.append(_valid(step, 8.0 - 0.1 * step, eps_mean=0.002 * step, erc_loss_posthoc=1.0 / step))
    vanilla_records = [_valid(0, 9.1, eps_mean=0.011, erc_loss_posthoc=0.95)]
    for step in range(1, 13):
        vanilla_records.append(_train(step, 10.5 - 0.2 * step))
        if step % 4 == 0 or step == 12:
            vanilla_records.append(_valid(step, 8.5 - 0.1 * step, eps_mean=0.0015 * step, erc_loss_posthoc=2.0 / step))
    aoe_records = [_valid(0, 9.2)] + [_train(s, 10.4 - 0.2 * s) for s in range(1, 17)] + \
        [_valid(s, 8.4 - 0.1 * s) for s in (4, 8, 12, 16)]
    runs = [_write_run(tmp_path / "erc", _config(erc=True), erc_records),
            _write_run(tmp_path / "vanilla", _config(), vanilla_records),
            _write_run(tmp_path / "aoe", _config(router="aoe"), aoe_records)]
    from moe_erc.commands.report import write_report

    markdown = write_report([str(r) for r in runs], str(tmp_path / "out")).read_text()
    assert "Compared at step 12 (6,144 tokens): the largest step at which every run has a validation record" in markdown
    rows = _rows(markdown)
    erc, vanilla, aoe = rows["erc"], rows["vanilla"], rows["aoe"]
    assert [erc["steps run"], vanilla["steps run"], aoe["steps run"]] == ["20", "12", "16"]
    assert erc["compared at step"] == vanilla["compared at step"] == aoe["compared at step"] == "12"
    assert erc["tokens"] == "6,144"
    # Validation loss, MaxVio and coupling: the validation records at step 12 (the last would be 6.0 / 7.3).
    assert float(erc["valid loss"]) == pytest.approx(8.0 - 1.2)
    assert float(vanilla["valid loss"]) == pytest.approx(8.5 - 1.2)
    assert float(aoe["valid loss"]) == pytest.approx(8.4 - 1.2)
    assert float(erc["MaxVio (valid)"]) == pytest.approx(0.12) and float(erc["coupling (valid)"]) == pytest.approx(0.62)
    # eps and the post-hoc ERC loss from the validation record at 12; n/a for AoE, which logs none.
    assert float(erc["eps mean"]) == pytest.approx(0.024) and float(vanilla["eps mean"]) == pytest.approx(0.018)
    assert float(erc["post-hoc ERC loss (alpha=1)"]) == pytest.approx(1 / 12, rel=5e-3)
    assert float(vanilla["post-hoc ERC loss (alpha=1)"]) == pytest.approx(2 / 12, rel=5e-3)
    assert aoe["eps mean"] == aoe["post-hoc ERC loss (alpha=1)"] == aoe["ERC loss (train, mean)"] == "n/a"
    # Train columns: mean over the logged steps in (11, 12] -> step 12 only (window max(1, 12 // 10) = 1).
    assert float(erc["train loss (mean)"]) == pytest.approx(10.0 - 2.4)
    assert float(erc["ERC loss (train, mean)"]) == pytest.approx(0.6)
    assert float(vanilla["MaxVio (train, mean)"]) == pytest.approx(1.2)
    assert float(erc["tokens/s (median)"]) == pytest.approx(1006.5)  # median over steps 1..12, not 1..20


def test_report_aligns_by_tokens_when_batch_sizes_differ_and_windows_the_train_loss(tmp_path):
    """Run "big" takes 2x the tokens per step of "small": compared at the same token count (big's step 30
    = small's step 60), train columns averaged over the last tenth up to there."""
    big = [_valid(s, 5.0 - 0.01 * s) for s in (0, 20, 30, 40)] + [_train(s, 6.0 - 0.01 * s) for s in range(1, 41)]
    small = [_valid(s, 5.5 - 0.01 * s) for s in (0, 20, 40, 60, 70)] + [_train(s, 6.5 - 0.01 * s) for s in range(1, 71)]
    runs = [_write_run(tmp_path / "big", _config(batch=16), big),
            _write_run(tmp_path / "small", _config(batch=8), small)]
    from moe_erc.commands.report import write_report

    markdown = write_report([str(r) for r in runs], str(tmp_path / "out")).read_text()
    assert "Compared at 30,720 tokens: the largest tokens at which every run has a validation record" in markdown
    rows = _rows(markdown)
    assert rows["big"]["compared at step"] == "30" and rows["small"]["compared at step"] == "60"
    assert rows["big"]["tokens"] == rows["small"]["tokens"] == "30,720"
    assert float(rows["big"]["valid loss"]) == pytest.approx(4.7)
    assert float(rows["small"]["valid loss"]) == pytest.approx(4.9)
    # big: mean of steps 28..30 (window 3); small: mean of steps 55..60 (window 6)
    assert float(rows["big"]["train loss (mean)"]) == pytest.approx(6.0 - 0.01 * 29)
    assert float(rows["small"]["train loss (mean)"]) == pytest.approx(6.5 - 0.01 * 57.5)
    assert rows["big"]["eps mean"] == "n/a"


def test_report_says_when_no_step_was_validated_by_every_run_and_takes_repeated_steps_once(tmp_path):
    """No common validation step beyond those a resume repeated: the later record of a repeated step wins."""
    a = [_valid(5, 4.0), _train(5, 5.0), _train(5, 4.5), _valid(5, 3.5)]  # resumed: step 5 logged twice
    b = [_valid(4, 4.2), _train(4, 5.1), _train(8, 4.9), _valid(8, 4.1)]
    runs = [_write_run(tmp_path / "a", _config(), a), _write_run(tmp_path / "b", _config(), b)]
    from moe_erc.commands.report import write_report

    markdown = write_report([str(r) for r in runs], str(tmp_path / "out")).read_text()
    assert "No step at which every run has a validation record" in markdown and "not aligned" in markdown
    rows = _rows(markdown)
    assert rows["a"]["compared at step"] == "5" and float(rows["a"]["valid loss"]) == pytest.approx(3.5)
    assert float(rows["a"]["train loss (mean)"]) == pytest.approx(4.5)
    assert rows["b"]["compared at step"] == "4" and float(rows["b"]["valid loss"]) == pytest.approx(4.2)


def test_a_running_jobs_half_written_last_line_is_skipped(tmp_path):
    from moe_erc.commands.report import Run

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "split": "train", "lm_loss": 6.0}\n'
                                       '{"step": 2, "split": "train", "lm_loss": 5.9}\n{"step": 3, "spl')
    assert [r["step"] for r in Run(run).records] == [1, 2]
