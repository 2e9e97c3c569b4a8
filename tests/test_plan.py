"""`moe-erc plan` on the paper's configs, layout refusals, and the GPU/CPU spec selection."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _plan(*args):
    return subprocess.run([sys.executable, "-m", "moe_erc", "plan", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=240)


@pytest.mark.parametrize("config, total, active, share", [
    ("erc-3b.yaml", 3.0e9, 500e6, 0.0018),
    ("erc-15b.yaml", 15.0e9, 700e6, 0.0072),
])
def test_plan_matches_the_papers_sizes_and_erc_share(config, total, active, share):
    proc = _plan(f"configs/{config}", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    plan = json.loads(proc.stdout.strip().splitlines()[-1])
    assert plan["total_params"] == pytest.approx(total, rel=0.10)
    assert plan["active_params"] == pytest.approx(active, rel=0.10)
    assert abs(plan["erc_flop_share"] - share) <= 0.0005  # within 0.05 percentage points
    assert plan["memory_gib"]["total_distributed_optimizer"] < plan["memory_gib"]["total"]
    assert plan["activation_gib_per_microbatch"] > 0 and plan["flops_per_token"] > 6 * plan["active_params"]


@pytest.mark.parametrize("args, message", [
    (["--world-size", "30", "parallel.tensor_model_parallel_size=4"], "world size 30 is not divisible"),
    (["--world-size", "30"], "expert_model_parallel_size*expert_tensor_parallel_size=8*1 must divide"),
    (["--world-size", "64", "parallel.expert_model_parallel_size=3"], "is not divisible by parallel.expert_model_parallel_size=3"),
    (["--world-size", "64", "parallel.tensor_model_parallel_size=32"], "num_attention_heads=16 is not divisible"),
    (["parallel.world_size=null"], "no world size"),
])
def test_plan_refuses_impossible_layouts_in_one_line(args, message):
    proc = _plan("configs/erc-15b.yaml", *args)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("moe-erc: error:") and message in last and "Traceback" not in proc.stderr


def test_transformer_engine_selects_the_te_spec_and_otherwise_our_grouped_experts(monkeypatch):
    """With TE: megatron's TE spec (its grouped GEMM experts). Without: the local spec with
    moe_erc.experts.GroupedExperts swapped in, and megatron's own grouped-GEMM switch left off."""
    from moe_erc import model as model_lib, spec
    from moe_erc.config import load_config
    from moe_erc.experts import GroupedExperts

    seen = []

    def fake_spec(config, use_transformer_engine, **kwargs):
        seen.append(use_transformer_engine)
        return real_spec(config, use_transformer_engine=False)

    real_spec = spec.get_gpt_decoder_block_spec
    monkeypatch.setattr(spec, "get_gpt_decoder_block_spec", fake_spec)
    from moe_erc import parallel
    from moe_erc.compat import prepare_runtime

    cfg = load_config(None, ["moe.moe_grouped_gemm=true", "model.num_layers=1"])
    assert model_lib.transformer_config(cfg).moe_grouped_gemm is False  # no TE here
    experts = []
    parallel.initialize(cfg, prepare_runtime("cpu"))
    try:
        for have_te in (True, False):
            monkeypatch.setattr(spec, "have_transformer_engine", lambda: have_te)
            block = spec.decoder_block_spec(cfg, model_lib.transformer_config(cfg))
            experts.append(spec._moe_submodules(block.layer_specs[0]).experts)
    finally:
        parallel.destroy()
    assert seen == [True, False]
    assert experts[1] is GroupedExperts and experts[0] is not GroupedExperts
