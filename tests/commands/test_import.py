"""`moe-erc import`: a transformers MoE checkpoint becomes a moe-erc checkpoint with the same logits, in any layout.

Small random models built from each transformers config class (no download), with the shapes of tests/launch.py's
TINY model so the imported checkpoint trains under the test harness as it is.
"""

import shutil
from pathlib import Path

import pytest
import torch

from launch import cli, losses, train

pytest.importorskip("transformers")

VOCAB = 512  # the tiny corpus's tokenizer
TOKENS = torch.tensor([[5, 17, 3, 99, 250, 7, 42, 11, 300, 2, 64, 511], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]])


def hf_model(kind: str, out: Path, tokenizer: str | None):
    """A random transformers model of ``kind`` (TINY's shapes, GQA, eps 1e-6, perturbed norms) saved to ``out``."""
    import transformers

    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  num_experts_per_tok=2, initializer_range=0.1)
    dense = dict(intermediate_size=128, moe_intermediate_size=64)
    config = {
        "mixtral": lambda: transformers.MixtralConfig(**common, intermediate_size=64, num_local_experts=4,
                                                      sliding_window=None),
        "qwen2_moe": lambda: transformers.Qwen2MoeConfig(**common, **dense, num_experts=4, norm_topk_prob=False,
                                                         shared_expert_intermediate_size=0, qkv_bias=False),
        "qwen3_moe": lambda: transformers.Qwen3MoeConfig(**common, **dense, num_experts=4, norm_topk_prob=True,
                                                         mlp_only_layers=[0]),
        "glm4_moe": lambda: transformers.Glm4MoeConfig(
            **common, **dense, n_routed_experts=4, n_shared_experts=0, n_group=1, topk_group=1,
            first_k_dense_replace=1, routed_scaling_factor=1.0, norm_topk_prob=True, use_qk_norm=False,
            attention_bias=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                   "partial_rotary_factor": 1.0}),
        "olmoe": lambda: transformers.OlmoeConfig(**common, intermediate_size=64, num_experts=4),
        # the class defaults kept, only widths and counts shrunk: a gated shared expert and QKV biases (Qwen2-MoE),
        # partial rotary 0.5, QKV biases, per-head QK norm, 1 shared expert, routed scaling 2.5 (GLM-4.5)
        "qwen2_moe_shared": lambda: transformers.Qwen2MoeConfig(**common, **dense, num_experts=4,
                                                                shared_expert_intermediate_size=96),
        # DeepSeek-V3's class defaults (Q LoRA, interleaved RoPE rows, group-limited routing, a shared expert, routed
        # scaling 2.5, dense first layer), widths shrunk; and Moonlight's uncompressed Q
        "deepseek_v3": lambda: transformers.DeepseekV3Config(
            **{**common, "num_key_value_heads": 4, "head_dim": 8}, **dense, n_routed_experts=4, n_group=2, topk_group=1,
            first_k_dense_replace=1, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
            v_head_dim=16),
        "moonlight": lambda: transformers.DeepseekV3Config(
            **{**common, "num_key_value_heads": 4, "head_dim": 8}, **dense, n_routed_experts=4, n_shared_experts=2, n_group=1,
            topk_group=1, first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=16,
            qk_rope_head_dim=8, v_head_dim=16, routed_scaling_factor=2.446),
        # DeepSeek-V2-Lite's shape: uncompressed Q, 2 shared experts, softmax over all without renormalisation
        "deepseek_v2_lite": lambda: transformers.DeepseekV2Config(
            **{**common, "num_key_value_heads": 4, "head_dim": 8}, **dense, n_routed_experts=4, n_shared_experts=2,
            first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
            v_head_dim=16),
        # gpt-oss's class defaults (sinks, windows on every other layer, yarn without truncation, biases everywhere,
        # the clamped GLU), widths shrunk and a window of 4 tokens so it bites on 12
        "gpt_oss": lambda: transformers.GptOssConfig(**common, intermediate_size=64, num_local_experts=4, sliding_window=4),
        "glm45": lambda: transformers.Glm4MoeConfig(**common, **dense, n_routed_experts=4, n_shared_experts=1,
                                                    n_group=1, topk_group=1, first_k_dense_replace=1,
                                                    attention_bias=True, use_qk_norm=True),
    }[kind]()
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # norms and GLM's correction bias away from their constant initial values
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if "norm" in name or "correction_bias" in name or name.endswith("bias"):
                tensor.add_(torch.randn_like(tensor) * 0.1)
    model.save_pretrained(str(out))
    if tokenizer:
        shutil.copy(tokenizer, out / "tokenizer.json")
    return model.eval()


def ours(checkpoint: Path) -> torch.Tensor:
    from moe_erc.training.checkpoint import one_process_model

    with one_process_model(str(checkpoint)) as (_cfg, net, _meta), torch.no_grad():
        return net(TOKENS, torch.arange(TOKENS.shape[1]).expand_as(TOKENS), None).float()[..., :VOCAB]


@pytest.mark.parametrize("kind, arch", [("mixtral", "MixtralForCausalLM"), ("qwen2_moe", "Qwen2MoeForCausalLM"),
                                        ("qwen3_moe", "Qwen3MoeForCausalLM"), ("glm4_moe", "Glm4MoeForCausalLM"),
                                        ("olmoe", "OlmoeForCausalLM"), ("qwen2_moe_shared", "Qwen2MoeForCausalLM"),
                                        ("glm45", "Glm4MoeForCausalLM"), ("deepseek_v3", "DeepseekV3ForCausalLM"),
                                        ("moonlight", "DeepseekV3ForCausalLM"),
                                        ("deepseek_v2_lite", "DeepseekV2ForCausalLM"),
                                        ("gpt_oss", "GptOssForCausalLM")])
def test_an_import_computes_the_hf_logits_exports_back_to_the_same_tensors_and_loads_in_any_layout(
        tiny_corpus, tmp_path, kind, arch):
    from safetensors.torch import load_file

    model = hf_model(kind, tmp_path / "hf", f"{tiny_corpus}.tokenizer.json")
    with torch.no_grad():
        theirs = model(TOKENS).logits.float()
    proc = cli("import", str(tmp_path / "hf"), "--out", str(tmp_path / "ck"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = ours(tmp_path / "ck")
    assert (got - theirs).abs().max().item() < 1e-4 * max(1.0, theirs.abs().max().item())
    assert theirs.abs().max().item() > 0.5  # logits far from zero: the comparison can fail
    proc = cli("export", str(tmp_path / "ck"), "--out", str(tmp_path / "back"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert arch in proc.stdout
    before, after = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert set(before) == set(after)
    for name, tensor in before.items():
        # Qwen2-MoE without a shared expert builds a zero-width one whose gate multiplies zeros: exported as 0
        if kind != "qwen2_moe" or "shared_expert_gate" not in name:
            assert torch.equal(tensor, after[name]), name
    if kind not in ("qwen3_moe", "glm45", "olmoe", "qwen2_moe_shared", "deepseek_v3", "gpt_oss"):  # the richest
        return
    # The same weights in other layouts: the step-0 validation loss of one process, EP=2 and TP=2 agree (gpt-oss's
    # expert biases keep the experts whole: expert-TP 1 beside attention's TP 2).
    etp = ["parallel.expert_tensor_parallel_size=1"] if kind == "gpt_oss" else []
    valid = {}
    for name, extra, nproc in (("one", [], 1), ("ep2", ["parallel.expert_model_parallel_size=2"], 2),
                               ("tp2", ["parallel.tensor_model_parallel_size=2", *etp], 2)):
        train(tmp_path / name, tiny_corpus, f"checkpoint.load={tmp_path / 'ck'}", "training.train_iters=1",
              *extra, nproc=nproc, config=tmp_path / "ck" / "config.yaml")
        valid[name] = _valid_loss_at_0(tmp_path / name)
    assert valid["ep2"] == pytest.approx(valid["one"], rel=2e-5), valid
    assert valid["tp2"] == pytest.approx(valid["one"], rel=2e-5), valid


@pytest.mark.parametrize("kind", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_an_imported_model_trains_with_erc_and_its_export_computes_the_trained_logits(tiny_corpus, tmp_path, kind):
    """Qwen3-MoE (QK-norm, a dense first layer, GQA), DeepSeek-V3 (MLA, group routing, shared expert, expert
    bias) and gpt-oss (sinks, windows, yarn, biases, the clamped GLU): 20 steps with ERC on train from the import;
    the export of the result loads in transformers and computes the trained checkpoint's logits."""
    from transformers import AutoModelForCausalLM

    hf_model(kind, tmp_path / "hf", f"{tiny_corpus}.tokenizer.json")
    cli("import", str(tmp_path / "hf"), "--out", str(tmp_path / "ck"), "--config-out", str(tmp_path / "q.yaml"),
        expect_success=True)
    run = tmp_path / "run"
    train(run, tiny_corpus, f"checkpoint.load={tmp_path / 'ck'}", "erc.enabled=true", "training.train_iters=20",
          config=tmp_path / "q.yaml")
    assert losses(run)[20] < losses(run)[1]
    cli("export", str(run / "checkpoints"), "--out", str(tmp_path / "back"), expect_success=True)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "back"), dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = model(TOKENS).logits.float()
    assert (ours(run / "checkpoints") - theirs).abs().max().item() < 1e-4 * max(1.0, theirs.abs().max().item())


def _valid_loss_at_0(run: Path) -> float:
    import json

    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("split") == "valid" and record.get("step") == 0:
            return record["lm_loss"]
    raise AssertionError(f"no step-0 validation record in {run}")


def test_what_is_not_an_importable_checkpoint_is_refused_in_one_line_and_nothing_is_written(tiny_corpus, tmp_path):
    (tmp_path / "empty").mkdir()
    cases = {"empty": "is not a Hugging Face checkpoint (no config.json)",
             "granite": "model_type 'granitemoe'"}
    import transformers

    transformers.GraniteMoeConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  num_local_experts=4, num_experts_per_tok=2).save_pretrained(str(tmp_path / "granite"))
    # damaged downloads: a truncated file, a garbage header, a shard the index names but the directory lacks
    model = hf_model("mixtral", tmp_path / "small-vocab", f"{tiny_corpus}.tokenizer.json")
    weights = (tmp_path / "small-vocab" / "model.safetensors").read_bytes()
    for name, data in (("truncated", weights[: len(weights) - 1000]), ("garbage", b"\x10\x00\x00\x00\x00\x00\x00\x00"
                                                                                 + b"{not json at all" + weights[24:])):
        shutil.copytree(tmp_path / "small-vocab", tmp_path / name)
        (tmp_path / name / "model.safetensors").write_bytes(data)
    cases["truncated"] = "model.safetensors is damaged (truncated: its tensors need"
    cases["garbage"] = "model.safetensors is damaged (its header is not JSON)"
    model.save_pretrained(str(tmp_path / "sharded"), max_shard_size="200KB")
    shards = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    cases["sharded"] = f"lacks 1 of the {len(shards)} weight shards its index names ({shards[-1].name})"
    cfg = (tmp_path / "small-vocab" / "config.json")
    cfg.write_text(cfg.read_text().replace(f'"vocab_size": {VOCAB}', '"vocab_size": 400'))
    cases["small-vocab"] = "has 512 ids but the model's vocab_size is 400"
    for name, message in cases.items():
        proc = cli("import", str(tmp_path / name), "--out", str(tmp_path / f"out-{name}"))
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr, proc.stderr
        assert not (tmp_path / f"out-{name}").exists()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    proc = cli("import", str(tmp_path / "olmoe"), "--out", str(tmp_path / "taken"))
    assert proc.returncode == 2 and (tmp_path / "taken" / "keep.txt").read_text() == "mine"


def test_a_failure_half_way_leaves_no_output(tiny_corpus, tmp_path, monkeypatch):
    """The checkpoint is written into a staging directory and moved into place only when complete."""
    from moe_erc.training import checkpoint
    from moe_erc.commands import hf_import

    hf_model("mixtral", tmp_path / "hf", f"{tiny_corpus}.tokenizer.json")

    def crash(*_args, **_kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(checkpoint, "save", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        hf_import.import_checkpoint(str(tmp_path / "hf"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("*out*"))


def dense_model(kind: str, out: Path):
    import transformers

    torch.manual_seed(1)
    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, intermediate_size=128, max_position_embeddings=64, rms_norm_eps=1e-6,
                  tie_word_embeddings=False, initializer_range=0.1)
    config = {"llama": transformers.LlamaConfig, "qwen3": transformers.Qwen3Config}[kind](**common)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(str(out))
    return model.eval()


@pytest.mark.parametrize("kind, experts, topk, width", [
    ("llama", 4, 2, None),   # every expert a copy of the dense MLP (granularity 1)
    ("qwen3", 8, 4, 64),     # finer experts: each copy split in 2 (granularity 2), top-4 = two whole copies
])
def test_an_upcycled_dense_model_computes_the_dense_logits_at_step_0(tmp_path, kind, experts, topk, width):
    model = dense_model(kind, tmp_path / "dense")
    with torch.no_grad():
        theirs = model(TOKENS).logits.float()
    args = ["--upcycle", "--num-experts", str(experts), "--topk", str(topk), *(["--expert-width", str(width)] if width else [])]
    proc = cli("import", str(tmp_path / "dense"), "--out", str(tmp_path / "ck"), *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (ours(tmp_path / "ck") - theirs).abs().max().item() < 1e-4 * max(1.0, theirs.abs().max().item())
    import yaml

    cfg = yaml.safe_load((tmp_path / "ck" / "config.yaml").read_text())
    assert (cfg["moe"]["num_experts"], cfg["moe"]["moe_router_topk"], cfg["moe"]["moe_ffn_hidden_size"]) == \
        (experts, topk, width or 128)


def test_upcycling_options_are_checked_in_one_line(tmp_path):
    dense_model("llama", tmp_path / "dense")
    for args, message in (([], "is a dense model; pass --upcycle --num-experts N --topk K"),
                          (["--upcycle", "--num-experts", "4"], "--upcycle needs --num-experts N and --topk K"),
                          (["--upcycle", "--num-experts", "3", "--topk", "2", "--expert-width", "64"],
                           "the number of experts must be a multiple of their ratio")):
        proc = cli("import", str(tmp_path / "dense"), "--out", str(tmp_path / "out"), *args)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr, \
            proc.stderr
        assert not (tmp_path / "out").exists()


def test_the_worked_example_imports_trains_with_erc_exports_and_evaluates(tmp_path):
    """scripts/import_example.py as docs/import.md runs it (3 steps instead of 50)."""
    pytest.importorskip("lm_eval")
    from launch import run_script

    proc = run_script("scripts/import_example.py", "--out", str(tmp_path / "ex"), "--steps", "3", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    result = json.loads((tmp_path / "ex" / "run" / "eval" / "step_0000003.json").read_text())
    assert result["n-samples"]["shakespeare_mc"]["effective"] == 4
    assert "| run | shakespeare_mc acc |" in (tmp_path / "ex" / "report" / "report.md").read_text()
    assert (tmp_path / "ex" / "hf-trained" / "model.safetensors").is_file()
