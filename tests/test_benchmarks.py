"""The benchmarks run end to end (small, on CPU) and print every row of their tables."""

from launch import REPO, run_script


def test_gpu_step_benchmark_prints_its_table_on_cpu():
    proc = run_script(REPO / "benchmarks" / "gpu_step.py", "--preset", "cpu", "--repeats", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line for line in proc.stdout.splitlines() if line.startswith("| ")}
    for measure in ("tokens/s", "MFU", "peak memory", "ERC on/off step time"):
        assert measure in rows, proc.stdout
    assert any(k.startswith("ERC fwd+bwd n=") and "x floor" in v for k, v in rows.items()), proc.stdout
    assert any(k.startswith("experts fwd+bwd") and "x faster" in v for k, v in rows.items()), proc.stdout


def test_optimizer_benchmark_prints_a_row_per_optimizer():
    proc = run_script(REPO / "benchmarks" / "optimizer_step.py", "--config", "configs/tiny.yaml", "--repeats", "1",
                      "--set", "model.num_layers=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line for line in proc.stdout.splitlines() if line.startswith("| ")}
    assert {"adamw", "muon", "symmetric"} <= set(rows), proc.stdout
    assert "1.00x" in rows["adamw"] and "centered_row_norm 1" in rows["symmetric"], proc.stdout
