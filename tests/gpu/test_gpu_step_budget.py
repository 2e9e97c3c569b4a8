"""Host syncs of one training step on a real GPU, seen by PyTorch's CUDA sync debug mode.

``benchmarks/step_budget.py`` counts syncs on CPU by rule; here CUDA itself says when the host waited:
``torch.cuda.set_sync_debug_mode("warn")`` warns at every synchronizing call (``item``, ``nonzero``, a
blocking copy to the host...). At EP = 1 the step must warn at most once: the trainer's one read. Same
scaled-down 3B shapes as tests/commands/test_step_budget.py, every router, one warm-up step.
"""

import warnings

import pytest
import torch

from moe_erc.commands import budget
from moe_erc.config import load_config


@pytest.mark.cuda_only("CUDA's sync debug mode needs a GPU")
@pytest.mark.parametrize("variant", ["erc", "aoe", "kmeans", "auxfree"])
def test_one_host_sync_per_step_on_the_gpu(tiny_corpus, tmp_path, device, variant):
    from moe_erc.training import parallel
    from moe_erc.training.metrics import clear_moe_layer_metrics

    cfg = load_config(None, budget.budget_overrides(str(tmp_path / "run"), tiny_corpus, device=device)
                      + budget.VARIANTS[variant])
    trainer = budget.build_trainer(cfg)
    try:
        trainer.train_step(trainer._budget_iterator)
        trainer.step += 1
        clear_moe_layer_metrics()
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                trainer.train_step(trainer._budget_iterator)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message).lower()]
        assert len(syncs) <= 1, syncs
    finally:
        trainer.close()
        parallel.destroy()
