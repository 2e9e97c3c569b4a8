"""`moe-erc export`: the transformers model computes the logits moe-erc computes, from any layout."""

import json
import subprocess
from pathlib import Path

import pytest
import torch

from launch import cli, train

pytest.importorskip("transformers")  # installed by scripts/setup_env.sh; the check names it if missing

TOKENS = torch.tensor([[5, 17, 3, 99, 250, 7, 42, 11, 300, 2, 64, 128],
                       [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]])


def moe_erc_logits(checkpoint: Path) -> torch.Tensor:
    """The reference: moe-erc's own forward of the checkpoint (one process, fp32), vocabulary padding cut."""
    from moe_erc.training.checkpoint import one_process_model

    with one_process_model(str(checkpoint)) as (cfg, net, meta), torch.no_grad():
        positions = torch.arange(TOKENS.shape[1]).expand_as(TOKENS)
        return net(TOKENS, positions, None).float()


def export(checkpoint: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    return cli("export", str(checkpoint), "--out", str(out), *args)


def hf_logits(out: Path) -> tuple[torch.Tensor, object]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(TOKENS).logits.float(), model


@pytest.fixture(scope="module")
def topk_run(tiny_corpus, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("topk") / "run"
    train(run, tiny_corpus, "training.train_iters=3", "optimizer.lr=3e-3")
    return run


@pytest.mark.parametrize("name, overrides, nproc, arch", [
    ("topk", None, 1, "MixtralForCausalLM"),
    # saved by PP=2 (one layer per stage; the embedding and the output layer on different ranks)
    ("pre-softmax-pp2", ["moe.moe_router_pre_softmax=true", "parallel.pipeline_model_parallel_size=2"], 2,
     "Qwen2MoeForCausalLM"),
    ("auxfree", ["moe.moe_router_score_function=sigmoid", "moe.moe_router_enable_expert_bias=true",
                 "moe.moe_router_load_balancing_type=none", "moe.moe_router_bias_update_rate=0.05"], 1,
     "Glm4MoeForCausalLM"),
    # a dense first layer (Qwen2-MoE's mlp_only_layers, renormalised top-K gates), ERC, experts over EP=2
    ("ep2-erc-dense-mix", ["erc.enabled=true", "parallel.expert_model_parallel_size=2", "model.moe_layer_freq=[0,1]"],
     2, "Qwen2MoeForCausalLM"),
    # TP=2 shards of the fused QKV with query groups, grouped experts (GroupedExperts' stacked weights)
    ("tp2-gqa-grouped", ["parallel.tensor_model_parallel_size=2", "moe.moe_grouped_gemm=true",
                         "model.num_query_groups=2"], 2, "MixtralForCausalLM"),
])
def test_exported_model_gives_moe_ercs_logits(tiny_corpus, topk_run, tmp_path, name, overrides, nproc, arch):
    run = topk_run
    if overrides is not None:
        run = tmp_path / "run"
        train(run, tiny_corpus, "training.train_iters=3", "optimizer.lr=3e-3", *overrides, nproc=nproc)
    out = tmp_path / "hf"
    proc = export(run / "checkpoints", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["architecture"] == arch
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= set(summary["files"])
    assert any(f.endswith(".safetensors") for f in summary["files"])
    ours = moe_erc_logits(run / "checkpoints")
    theirs, model = hf_logits(out)
    vocab = model.config.vocab_size
    assert theirs.shape == (*TOKENS.shape, vocab) and ours.shape[-1] >= vocab
    assert (theirs - ours[..., :vocab]).abs().max().item() < 1e-4, (theirs - ours[..., :vocab]).abs().max()
    if name == "auxfree":  # the correction bias moved, and it is the one the router uses
        bias = model.model.layers[0].mlp.gate.e_score_correction_bias
        assert bias.abs().max() > 0


def test_the_tokenizer_and_generation_config_round_trip(topk_run, tmp_path):
    from transformers import AutoTokenizer, GenerationConfig

    from moe_erc.data.tokenizer import _load_tokenizer_file

    run = topk_run
    out = tmp_path / "hf"
    assert export(run / "checkpoints", out, "--dtype", "bf16").returncode == 0
    ours = _load_tokenizer_file(run / "tokenizer.json")
    theirs = AutoTokenizer.from_pretrained(str(out))
    text = "To be, or not to be, that is the question."
    assert theirs(text, add_special_tokens=False)["input_ids"] == ours.tokenize(text)
    assert theirs.eos_token_id == ours.eod and theirs.pad_token_id == ours.eod
    assert GenerationConfig.from_pretrained(str(out)).eos_token_id == ours.eod
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["vocab_size"] == ours.vocab_size


def test_a_model_no_transformers_class_expresses_is_refused_in_one_line(tiny_corpus, tmp_path):
    run = tmp_path / "run"
    train(run, tiny_corpus, "training.train_iters=1", "moe.router=aoe")
    proc = export(run / "checkpoints", tmp_path / "hf")
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line == ("moe-erc: error: cannot export to transformers: moe.router=aoe (no transformers model routes "
                    "like Autonomy-of-Experts)"), line
    assert not (tmp_path / "hf").exists()


MLA = ["model.multi_latent_attention=true", "model.kv_lora_rank=16", "model.qk_head_dim=16",
       "model.qk_pos_emb_head_dim=8", "model.v_head_dim=16", "model.qk_layernorm=true"]


GPT_OSS = ["model.activation=quick_gelu", "model.activation_func_clamp_value=7", "model.glu_linear_offset=1",
           "model.softmax_type=learnable", "model.window_size=[7,0]", "model.window_attn_skip_freq=2"]


@pytest.mark.parametrize("overrides, arch_or_message", [
    ([], "mixtral"),
    (["moe.moe_router_pre_softmax=true"], "qwen2_moe"),
    (["model.moe_layer_freq=2"], "qwen2_moe"),
    (["moe.moe_router_score_function=sigmoid", "moe.moe_router_enable_expert_bias=true"], "glm4_moe"),
    (["moe.router=kmeans", "moe.moe_router_load_balancing_type=none"],
     "moe.router=kmeans (no transformers model routes like online K-Means)"),
    (["model.qk_layernorm=true"], "qwen3_moe"),
    (["model.normalization=LayerNorm", "model.add_bias_linear=true"], "model.normalization=LayerNorm (the MoE classes "
     "use RMSNorm); model.add_bias_linear=true"),
    (["moe.moe_expert_capacity_factor=1.0"], "moe.moe_expert_capacity_factor (token dropping)"),
    (["model.qk_layernorm=true", "model.qk_layernorm_over=projection"], "olmoe"),
    (["moe.moe_shared_expert_intermediate_size=64", "moe.moe_shared_expert_gate=true", "model.add_qkv_bias=true"],
     "qwen2_moe"),
    ([*MLA, "moe.moe_router_score_function=sigmoid", "moe.moe_router_enable_expert_bias=true",
      "moe.moe_shared_expert_intermediate_size=1024", "model.mtp_num_layers=1"], "deepseek_v3"),
    ([*MLA, "moe.moe_router_pre_softmax=true"], "deepseek_v2"),
    (MLA, "multi-latent attention with routing other than DeepSeek-V3's"),
    (["model.window_size=[7,0]"], "model.window_size (its transformers mapping is not written yet)"),
    (GPT_OSS, "gpt_oss"),
    ([*GPT_OSS, "model.rope_type=yarn", "model.add_bias_linear=true", "moe.moe_grouped_gemm=true"], "gpt_oss"),
    (["model.add_bias_linear=true"], "model.add_bias_linear=true (linear biases outside gpt-oss"),
    ([*GPT_OSS, "moe.moe_router_pre_softmax=true", "model.glu_linear_offset=0"],
     "gpt-oss with model.glu_linear_offset != 1"),
    ([*GPT_OSS, "model.moe_layer_freq=2"], "gpt-oss with dense layers"),
    (["model.mtp_num_layers=1"], "model.mtp_num_layers (outside DeepSeek-V3"),
    (["moe.moe_router_score_function=sigmoid", "moe.moe_router_enable_expert_bias=true", "model.num_layers=3",
      "model.moe_layer_freq=[1,0,1]"], "dense layers after MoE layers with sigmoid routing"),
])
def test_the_architecture_follows_the_routing(overrides, arch_or_message):
    from moe_erc.config import load_config
    from moe_erc.commands.export import ExportError, architecture

    cfg = load_config(None, overrides)
    if arch_or_message in ("mixtral", "qwen2_moe", "qwen3_moe", "glm4_moe", "olmoe", "deepseek_v2", "deepseek_v3",
                           "gpt_oss"):
        assert architecture(cfg) == arch_or_message
    else:
        with pytest.raises(ExportError, match="cannot export to transformers") as err:
            architecture(cfg)
        assert arch_or_message in str(err.value)


def test_an_export_replaces_a_directory_only_when_complete(topk_run, tmp_path, monkeypatch):
    """A non-empty --out needs --force; an export that fails half-way leaves the earlier one as it was."""
    from moe_erc.commands import export as export_module

    out = tmp_path / "hf"
    assert export(topk_run / "checkpoints", out).returncode == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    refused = export(topk_run / "checkpoints", out)
    assert refused.returncode == 2 and "is not empty" in refused.stderr.strip().splitlines()[-1]

    def fail(*_args, **_kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export_module, "save_tokenizer", fail)  # fails after the weights were written
    with pytest.raises(OSError):
        export_module.export(str(topk_run / "checkpoints"), str(out), "fp32", None, "5GB")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".hf.")]  # no staging left behind
    monkeypatch.undo()
    forced = export(topk_run / "checkpoints", out, "--force")
    assert forced.returncode == 0 and (out / "config.json").is_file()


def test_an_export_onto_a_directory_another_export_is_writing_is_refused(topk_run, tmp_path):
    """The lock beside --out (held here by this test's live pid) stops a second writer in one line; once the holder
    is gone (a pid that has exited) the export takes it over, writes, and leaves no lock."""
    import json
    import os
    import socket

    out = tmp_path / "hf"
    lock = tmp_path / ".hf.lock"
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": "then", "job": None}))
    proc = export(topk_run / "checkpoints", out)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert f"--out {out} is being written by another process (host {socket.gethostname()}, pid {os.getpid()}" in line
    assert not out.exists()
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": _exited_pid(), "since": "then"}))
    proc = export(topk_run / "checkpoints", out)
    assert proc.returncode == 0 and "taking over the lock" in proc.stdout and (out / "config.json").is_file()
    assert not lock.exists()


def _exited_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_full_disk_during_an_export_is_one_line_and_leaves_no_output(topk_run, tmp_path, monkeypatch, capsys):
    import errno

    from moe_erc import cli
    from moe_erc.commands import export as export_module

    def full(_tok, out):
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "tokenizer.json"))

    monkeypatch.setattr(export_module, "save_tokenizer", full)  # after the weights are written
    assert cli.main(["export", str(topk_run / "checkpoints"), "--out", str(tmp_path / "hf")]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]  # (transformers' shard progress bar before it)
    assert line.startswith("moe-erc: error: no space left on device writing ") and "GiB free on" in line, line
    assert "earlier outputs are as they were" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no staging, no lock, no --out
