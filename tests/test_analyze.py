"""`moe-erc analyze` against an independent computation on the checkpoint's own tensors.

The checkpoint is written by a grouped-GEMM model (configs/erc-3b.yaml and erc-15b.yaml use
`moe.moe_grouped_gemm=true`) under EP=2; the reference reads the router and gate weights straight from the
torch-DCP files (no model, no moe-erc loading code) and evaluates `erc.erc_loss(..., noise=False)`.
"""

import json
import subprocess
import sys

import pytest
import torch

from launch import train


def test_analyze_of_a_grouped_gemm_ep2_checkpoint_equals_erc_loss_on_its_tensors(tiny_corpus, tmp_path):
    from torch.distributed.checkpoint import load as dcp_load

    from moe_erc import erc

    run = tmp_path / "run"
    train(run, tiny_corpus, "training.train_iters=2", "erc.enabled=true", "moe.moe_grouped_gemm=true",
          "parallel.expert_model_parallel_size=2", nproc=2)
    proc = subprocess.run([sys.executable, "-m", "moe_erc", "analyze", str(run / "checkpoints"), "--json",
                           "--alphas", "0.5,1,2"], capture_output=True, text=True, cwd=tmp_path, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])

    layers, n, d, D = 2, 4, 64, 64  # tests/launch.py TINY
    tensors = {"decoder.layers.mlp.router.weight": torch.empty(layers, n, d),
               "decoder.layers.mlp.experts.experts.linear_fc1.weight": torch.empty(layers, n, 2 * D, d)}
    dcp_load(tensors, checkpoint_id=str(run / "checkpoints" / "step_0000002"), no_dist=True)
    router, fc1 = tensors.values()
    assert result["layers"].keys() == {"1", "2"}
    for layer in range(layers):
        report = result["layers"][str(layer + 1)]
        gate = fc1[layer, :, :D]  # SwiGLU: [gate; up] rows per expert
        for alpha in (0.5, 1.0, 2.0):
            expected = float(erc.erc_loss(router[layer], gate, alpha, noise=False))
            assert report["erc_loss"][str(alpha)] == pytest.approx(expected, rel=1e-5, abs=1e-8), (layer, alpha)
        eps = erc.noise_bounds(router[layer])
        assert report["eps_mean"] == pytest.approx(float(eps.mean()), rel=1e-5)
