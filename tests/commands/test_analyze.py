"""`moe-erc analyze` against an independent computation on the checkpoint's own tensors.

The checkpoint is written by a grouped-GEMM model (configs/erc-3b.yaml and erc-15b.yaml use
`moe.moe_grouped_gemm=true`) under EP=2; the reference reads the router and gate weights straight from the
torch-DCP files (no model, no moe-erc loading code) and evaluates `erc.erc_loss(..., noise=False)`.
"""

import json

import pytest
import torch

from launch import cli, train


def test_analyze_of_a_grouped_gemm_ep2_checkpoint_equals_erc_loss_on_its_tensors(tiny_corpus, tmp_path):
    from torch.distributed.checkpoint import load as dcp_load

    from moe_erc.model import erc

    run = tmp_path / "run"
    train(run, tiny_corpus, "training.train_iters=2", "erc.enabled=true", "moe.moe_grouped_gemm=true",
          "parallel.expert_model_parallel_size=2", nproc=2)
    proc = cli("analyze", str(run / "checkpoints"), "--json", "--alphas", "0.5,1,2", cwd=tmp_path)
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


def test_every_method_with_a_router_matrix_logs_eps_and_the_posthoc_erc_loss(tiny_corpus, tmp_path):
    """A vanilla run (no ERC) logs eps at train log steps and, at evaluation, the post-hoc ERC loss at
    alpha=1 that `moe-erc analyze` computes from its final checkpoint; methods without a router matrix
    (K-Means) log neither."""
    run = tmp_path / "vanilla"
    train(run, tiny_corpus, "training.train_iters=2")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in records if r["split"] == "valid"][-1]
    assert all(r["eps_mean"] > 0 for r in records if r["split"] == "train")
    proc = cli("analyze", str(run / "checkpoints"), "--json", "--alphas", "1", cwd=tmp_path)
    analysis = json.loads(proc.stdout.strip().splitlines()[-1])["layers"]
    for layer, logged in enumerate(final["erc_loss_posthoc_per_layer"]):
        assert logged == pytest.approx(analysis[str(layer + 1)]["erc_loss"]["1.0"], rel=1e-5, abs=1e-9)
        assert final["eps_mean_per_layer"][layer] == pytest.approx(analysis[str(layer + 1)]["eps_mean"], rel=1e-5)
    kmeans = tmp_path / "kmeans"
    train(kmeans, tiny_corpus, "training.train_iters=1", "moe.router=kmeans", "moe.moe_router_load_balancing_type=none")
    for record in map(json.loads, (kmeans / "metrics.jsonl").read_text().splitlines()):
        assert "eps_mean" not in record and "erc_loss_posthoc" not in record
