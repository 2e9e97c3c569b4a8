"""The GPU tier: every test under tests/gpu is marked ``gpu`` and runs on a CUDA device.

Run it with ``scripts/test.sh --gpu`` on a GPU machine. Where CUDA is missing (CPU CI) the tests are
collected and skipped, so ``python -m pytest tests`` stays green and fast.

``MOE_ERC_GPU_TIER_DEVICE=cpu`` runs the tier on the CPU instead of skipping it (``training.device=cpu``), to
develop and check its logic without a GPU; tests marked ``cuda_only`` (distributed optimizer, several
GPUs) are skipped in that mode. tests/conftest.py (offline environment, ``tiny_corpus``) applies here too,
and puts tests/ on ``sys.path`` so ``from launch import ...`` works.
"""

import os
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
DEVICE = "cpu" if os.environ.get("MOE_ERC_GPU_TIER_DEVICE") == "cpu" else "cuda"
NO_GPU = "needs a CUDA GPU (scripts/test.sh --gpu on a GPU machine)"


@pytest.hookimpl(tryfirst=True)  # before `-m gpu` selects by marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE not in Path(item.path).resolve().parents:
            continue
        item.add_marker(pytest.mark.gpu)
        cuda_only = item.get_closest_marker("cuda_only")
        if DEVICE == "cuda" and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason=NO_GPU))
        elif DEVICE == "cpu" and cuda_only is not None:
            item.add_marker(pytest.mark.skip(reason=f"MOE_ERC_GPU_TIER_DEVICE=cpu: {cuda_only.args[0]}"))


@pytest.fixture(scope="session")
def device() -> str:
    """``cuda``, or ``cpu`` under ``MOE_ERC_GPU_TIER_DEVICE=cpu``."""
    return DEVICE
