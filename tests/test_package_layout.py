"""The package's layers (foundation -> data, model -> training -> commands -> entry points) and what the layout
must never change: a checkpoint written by the flat package of before resumes exactly under this one."""

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from launch import REPO, TINY, losses, records, train

PACKAGE = REPO / "moe_erc"
# Lowest first. A module may import its own layer and the ones below; data and model, side by side, not each other.
LAYERS = {"errors": 0, "config": 0, "compat": 0, "outputs": 0, "__init__": 0,
          "data": 1, "model": 1, "training": 2, "commands": 3, "cli": 4, "train": 4, "__main__": 4}
ROOT = {"__init__.py", "__main__.py", "cli.py", "config.py", "errors.py", "outputs.py", "train.py", "compat", "data",
        "model", "training", "commands"}
# The last commit with the flat package (moe_erc/trainer.py, moe_erc/erc.py, ...).
FLAT_PACKAGE_COMMIT = "e284d59fbaf5d69da9011ebc4001f57b08bb741a"


def _part(module: str) -> str:
    """``moe_erc.training.trainer`` -> ``training``; ``moe_erc`` -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> set[str]:
    """Every moe_erc module ``path`` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "moe_erc"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "moe_erc":
            found |= {f"{node.module}.{a.name}" for a in node.names} if node.module == "moe_erc" else {node.module}
    return found


def test_no_module_imports_a_layer_above_its_own():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = _part(".".join(path.relative_to(REPO).with_suffix("").parts))
        for target in _imports(path):
            other = _part(target)
            if LAYERS[other] > LAYERS[own] or {own, other} == {"data", "model"}:
                upward.append(f"{path.relative_to(REPO)} imports {target}")
    assert not upward, "\n".join(upward)


def test_the_package_root_holds_only_what_every_layer_uses():
    # (a folder with no source left, e.g. a moved module's old __pycache__, is not part of the package)
    entries = {p.name for p in PACKAGE.iterdir() if p.suffix == ".py" or (p.is_dir() and any(p.rglob("*.py")))}
    assert entries == ROOT
    assert all(name in LAYERS for name in (n.removesuffix(".py") for n in ROOT))


def test_a_checkpoint_of_the_flat_package_resumes_exactly(tiny_corpus, tmp_path):
    """The flat package (checked out from git) trains 3 steps, saving at 2; this one resumes from its step 2 and logs
    step 3's loss and gradient norm as the flat package did: weights, optimizer, schedule, RNG and data position all
    load. Nothing in either checkpoint names a moe_erc module (a pickled class would tie checkpoints to paths)."""
    have = shutil.which("git") and subprocess.run(
        ["git", "cat-file", "-e", f"{FLAT_PACKAGE_COMMIT}^{{commit}}"], cwd=REPO, capture_output=True).returncode == 0
    if not have:
        pytest.skip(f"commit {FLAT_PACKAGE_COMMIT[:9]} (the flat package) is not in this clone's history")
    old_src = tmp_path / "flat"
    old_src.mkdir()
    archive = subprocess.run(["git", "archive", FLAT_PACKAGE_COMMIT, "moe_erc"], cwd=REPO, capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(old_src)], input=archive, check=True)
    method = ["erc.enabled=true", "optimizer.name=symmetric", "optimizer.symmetric_preset=paper",
              "model.hidden_dropout=0.1"]  # ERC noise, per-class optimizer state and dropout: RNG must load too
    old_run = tmp_path / "old-run"
    args = [*TINY, f"data.data_path={tiny_corpus}", f"logging.run_dir={old_run}", "training.train_iters=3",
            "checkpoint.save_interval=2", *method]
    code = ("import sys, moe_erc; print('package', moe_erc.__file__); from moe_erc.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, "train", *args], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(old_src),  # as many threads as launch.train's
                               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"package {old_src / 'moe_erc' / '__init__.py'}" in proc.stdout
    old_step2 = old_run / "checkpoints" / "step_0000002"
    assert old_step2.is_dir()

    new_run = tmp_path / "new-run"
    train(new_run, tiny_corpus, "training.train_iters=3", f"training.resume={old_step2}", *method)
    assert list(losses(new_run)) == [3]
    assert losses(new_run)[3] == pytest.approx(losses(old_run)[3], rel=1e-6, abs=0)
    assert records(new_run)[0]["grad_norm"] == pytest.approx(records(old_run)[-1]["grad_norm"], rel=1e-6, abs=0)
    for step_dir in (old_step2, new_run / "checkpoints" / "step_0000003"):
        named = [f.name for f in step_dir.iterdir() if f.name != "moe_erc.json" and b"moe_erc" in f.read_bytes()]
        assert not named, f"{step_dir}: {named} name a moe_erc module"
