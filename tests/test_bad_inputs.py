"""Every user input is checked before work starts: a table of bad inputs through the CLI entry point.

Each case must end with exit code 2 (3 for a deliberate halt), one line on stderr starting with
``moe-erc: error:`` or ``preprocess: error:``, naming the problem, and no traceback. Cases run in this
process through ``moe_erc.cli.main`` (the function the ``moe-erc`` console script calls) to keep the
table fast; tests/test_config.py runs the same path in a subprocess.
"""

import shutil
from pathlib import Path

import pytest

from moe_erc.cli import main as cli_main

SMALL = ["model.num_layers=1", "model.hidden_size=32", "model.num_attention_heads=2", "model.seq_length=32",
         "moe.num_experts=4", "moe.moe_ffn_hidden_size=32", "training.micro_batch_size=2",
         "training.global_batch_size=2", "training.train_iters=1", "data.split=3,1,0", "logging.tensorboard=false"]


@pytest.fixture(scope="module")
def files(tiny_corpus, tmp_path_factory):
    """Broken copies of the tiny corpus and other bad files, made once."""
    root = tmp_path_factory.mktemp("bad")
    prefix = Path(tiny_corpus)

    def copy(name):
        target = root / name
        for suffix in (".bin", ".idx", ".tokenizer.json"):
            shutil.copy(f"{prefix}{suffix}", f"{target}{suffix}")
        return target

    truncated = copy("truncated")
    truncated.with_suffix(".bin").write_bytes(b"\0" * 10)
    garbage = copy("garbage")
    garbage.with_suffix(".idx").write_bytes(b"not an index at all")
    notok = copy("notok")
    Path(f"{notok}.tokenizer.json").unlink()
    from moe_erc.data.tokenizer import train_bpe

    other_tok = root / "other_tokenizer.json"
    train_bpe(["a different corpus, a different vocabulary"] * 20, 300).save(other_tok)
    (root / "a_file").write_text("occupied")
    (root / "bad.yaml").write_text("model:\n  num_layers: [1,\n")
    (root / "list.yaml").write_text("- model\n- moe\n")
    (root / "section.yaml").write_text("model: 3\n")
    (root / "empty.txt").write_text("   \n\n")
    (root / "text.txt").write_text("to be or not to be\n")
    (root / "record.jsonl").write_text('{"content": "hello"}\n')
    for name, text in (("garbage", "not json at all\n{\"step\": 1, \"split\": \"train\"}\n"), ("empty", "")):
        (root / f"run_{name}").mkdir()
        (root / f"run_{name}" / "metrics.jsonl").write_text(text)
    broken_ckpt = root / "ckpt" / "step_0000001"
    broken_ckpt.mkdir(parents=True)
    (broken_ckpt / "moe_erc.json").write_text("{}")
    return {"prefix": str(prefix), "root": root, "truncated": str(truncated), "garbage": str(garbage),
            "notok": str(notok), "other_tok": str(other_tok)}


def T(*overrides):  # a training command on the small model and the tiny corpus
    return ("train", list(overrides))


CASES = {
    # -- config: structure and keys
    "unknown section": (T("modle.num_layers=2"), "unknown config section 'modle'; did you mean 'model'?"),
    "unknown key": (T("moe.num_expert=4"), "did you mean 'moe.num_experts'?"),
    "override without =": (T("training.train_iters"), "must look like section.key=value"),
    "override without section": (T("train_iters=3"), "must be section.key"),
    "missing config file": (("train", ["{root}/nope.yaml"]), "config file {root}/nope.yaml does not exist"),
    "yaml syntax": (("train", ["{root}/bad.yaml"]), "YAML syntax error at line"),
    "yaml not a mapping": (("train", ["{root}/list.yaml"]), "the top level must be a mapping"),
    "section not a mapping": (("train", ["{root}/section.yaml"]), "config section 'model' must be a mapping"),
    # -- config: types and ranges
    "int type": (T("training.train_iters=many"), "training.train_iters='many': Input should be a valid integer"),
    "float type": (T("optimizer.lr=fast"), "optimizer.lr"),
    "bool type": (T("erc.enabled=maybe"), "erc.enabled"),
    "bad router": (T("moe.router=magic"), "moe.router"),
    "bad precision": (T("training.precision=fp8"), "training.precision"),
    "bad device": (T("training.device=tpu"), "training.device"),
    "bad dispatcher": (T("moe.moe_token_dispatcher_type=flex2"), "moe.moe_token_dispatcher_type"),
    "bad balancing": (T("moe.moe_router_load_balancing_type=sinkhorn2"), "moe_router_load_balancing_type"),
    "zero layers": (T("model.num_layers=0"), "model.num_layers=0 must be >= 1"),
    "zero experts": (T("moe.num_experts=0"), "moe.num_experts=0 must be >= 1"),
    "topk > experts": (T("moe.moe_router_topk=9"), "moe.moe_router_topk=9 exceeds moe.num_experts=4"),
    "negative alpha": (T("erc.alpha=-0.5"), "erc.alpha=-0.5 must be >= 0"),
    "negative coeff": (T("erc.coeff=-1"), "erc.coeff=-1.0 must be >= 0"),
    "heads vs hidden": (T("model.num_attention_heads=3"), "model.hidden_size=32 is not divisible by"),
    "query groups": (T("model.num_query_groups=3"), "is not divisible by model.num_query_groups=3"),
    "min lr above lr": (T("optimizer.min_lr=1"), "optimizer.min_lr=1.0 must be between 0 and optimizer.lr"),
    "negative warmup": (T("optimizer.lr_warmup_iters=-1"), "optimizer.lr_warmup_iters=-1 must be >= 0"),
    "negative clip": (T("optimizer.clip_grad=-1"), "optimizer.clip_grad=-1.0 must be >= 0"),
    "dropout 1": (T("model.hidden_dropout=1.0"), "must be in [0, 1)"),
    "layer freq list": (T("model.moe_layer_freq=[1,0]"), "needs one 0/1 per layer"),
    "layer freq zero": (T("model.moe_layer_freq=0"), "model.moe_layer_freq=0 must be >= 1"),
    "split": (T("data.split=9,one"), "data.split='9,one' must be comma-separated"),
    "micro batch 0": (T("training.micro_batch_size=0"), "training.micro_batch_size=0 must be >= 1"),
    "train iters 0": (T("training.train_iters=0"), "training.train_iters=0 must be >= 1"),
    "log interval 0": (T("logging.log_interval=0"), "logging.log_interval=0 must be >= 1"),
    "save interval 0": (T("checkpoint.save_interval=0"), "checkpoint.save_interval=0 must be >= 1"),
    "eval iters negative": (T("training.eval_iters=-1"), "training.eval_iters=-1 must be >= 0"),
    "keep 0": (T("checkpoint.keep_last=0"), "checkpoint.keep_last=0 must be >= 1"),
    "erc with kmeans": (T("moe.router=kmeans", "erc.enabled=true"), "needs a router matrix"),
    "kmeans with aux loss": (T("moe.router=kmeans"), "set moe.moe_router_load_balancing_type=none"),
    "kmeans momentum": (T("moe.kmeans_momentum=1"), "moe.kmeans_momentum=1.0 must be in [0, 1)"),
    "aoe rank": (T("moe.aoe_rank=64"), "moe.aoe_rank=64 must be in 1..model.hidden_size=32"),
    "top-1 softmax": (T("moe.moe_router_topk=1"), "needs moe.moe_router_pre_softmax=true"),
    # -- optimizer values (unchecked, these would reach torch/megatron, or train)
    "muon coefficients": (T("optimizer.name=muon", "optimizer.muon_coefficient_type=cubic"), "muon_coefficient_type"),
    "newton-schulz steps": (T("optimizer.muon_num_ns_steps=0"), "muon_num_ns_steps=0 must be >= 1"),
    "muon momentum": (T("optimizer.muon_momentum=1.5"), "muon_momentum=1.5 must be in [0, 1)"),
    "adam beta": (T("optimizer.adam_beta2=1.2"), "adam_beta2=1.2 must be in [0, 1)"),
    "weight decay": (T("optimizer.weight_decay=-0.1"), "weight_decay=-0.1 must be >= 0"),
    "lr decay iters": (T("optimizer.lr_decay_iters=-5"), "lr_decay_iters=-5 must be >= 1"),
    "odd head dim": (T("model.hidden_size=30", "model.num_attention_heads=2"), "needs an even number of rotated"),
    # -- layout (checked before any process group starts)
    "ep needs processes": (T("parallel.expert_model_parallel_size=2"), "must divide world_size/pipeline"),
    "experts by ep": (T("parallel.expert_model_parallel_size=3"), "moe.num_experts=4 is not divisible by"),
    "tp needs processes": (T("parallel.tensor_model_parallel_size=2"), "world size 1 is not divisible"),
    "world size mismatch": (T("parallel.world_size=8"), "parallel.world_size=8 but 1 processes were launched"),
    "batch multiple": (T("training.global_batch_size=3"), "must be a multiple of micro_batch_size"),
    "distributed optimizer on cpu": (T("parallel.use_distributed_optimizer=true"), "needs CUDA"),
    "fp16 on cpu": (T("training.precision=fp16"), "precision=fp16 needs a CUDA GPU"),
    "cuda asked, none here": (T("training.device=cuda"), "sees no CUDA device"),
    # -- data and tokenizer
    "missing data": (T("data.data_path={root}/missing"), "missing"),
    "truncated bin": (T("data.data_path={truncated}"), "truncated"),
    "garbage idx": (T("data.data_path={garbage}"), "garbage.idx"),
    "no tokenizer beside data": (T("data.data_path={notok}"), "tokenizer"),
    "tokenizer mismatch": (T("data.data_path={prefix}", "tokenizer.path={other_tok}"), "different tokenizer"),
    "missing tokenizer file": (T("data.data_path={prefix}", "tokenizer.path={root}/none.json"), "none.json"),
    "blend odd length": (T("data.data_path=[0.5, {prefix}, 0.5]"), "data"),
    "vocab too small": (T("data.data_path={prefix}", "model.vocab_size=10"), "raise model.vocab_size"),
    "unwritable run dir": (T("data.data_path={prefix}", "logging.run_dir={root}/a_file/run"),
                           "set logging.run_dir to a writable path"),
    # -- checkpoints
    "resume from nothing": (T("data.data_path={prefix}", "training.resume={root}/nothing"), "no complete checkpoint"),
    "load from nothing": (T("data.data_path={prefix}", "checkpoint.load={root}/nothing"), "no complete checkpoint"),
    "resume from broken": (T("data.data_path={prefix}", "training.resume={root}/ckpt/step_0000001"),
                           "is incomplete"),
    # -- other commands
    "preprocess missing input": (("preprocess", ["--input", "{root}/nope.txt", "--output-prefix", "{root}/o"]),
                                 "does not exist"),
    "preprocess empty corpus": (("preprocess", ["--input", "{root}/empty.txt", "--output-prefix", "{root}/e"]),
                                "no non-blank documents"),
    "preprocess json key": (("preprocess", ["--input", "{root}/record.jsonl", "--output-prefix", "{root}/j"]),
                            "text"),
    "analyze nothing": (("analyze", ["{root}/nothing"]), "no complete checkpoint"),
    "plan without world size": (("plan", ["configs/tiny.yaml"]), "no world size"),
    # -- outputs and command arguments
    "analyze negative alpha": (("analyze", ["{root}/ckpt", "--alphas", "1,-0.5"]), "must be comma-separated numbers >= 0"),
    "analyze nan alpha": (("analyze", ["{root}/ckpt", "--alphas", "nan"]), "numbers >= 0"),
    "analyze out is a file": (("analyze", ["{root}/ckpt", "--out", "{root}/a_file"]), "is a file; give a directory"),
    "report out is a file": (("report", ["{root}/run_garbage", "--out", "{root}/a_file"]), "is a file"),
    "report garbage metrics": (("report", ["{root}/run_garbage"]), "line 1 is not JSON"),
    "report empty metrics": (("report", ["{root}/run_empty"]), "has no records yet"),
    "export into non-empty": (("export", ["{root}/ckpt", "--out", "{root}"]), "is not empty; give a new directory"),
    "export out is a file": (("export", ["{root}/ckpt", "--out", "{root}/a_file"]), "is a file"),
    "export shard size": (("export", ["{root}/ckpt", "--out", "{root}/new_export", "--max-shard-size", "lots"]),
                          "--max-shard-size 'lots'"),
    "preprocess out under a file": (("preprocess", ["--input", "{root}/text.txt", "--output-prefix",
                                                    "{root}/a_file/o"]), "is a file"),
    "study seeds": (("study", ["--seeds", "abc"]), "--seeds 'abc' must be comma-separated integers"),
    "study no methods": (("study", ["--methods", ","]), "names no method"),
    "plan world size 0": (("plan", ["configs/tiny.yaml", "--world-size", "0"]), "--world-size 0 must be >= 1"),
    "plan world size negative": (("plan", ["configs/tiny.yaml", "--world-size", "-8"]), "--world-size -8 must be"),
    "plan without vocab": (("plan", ["configs/tiny.yaml", "--world-size", "1"]), "model.vocab_size is not set"),
}


def test_at_least_fifty_cases():
    assert len(CASES) >= 50


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_line_and_exit_code_2(name, files, capsys, tmp_path, monkeypatch):
    (command, args), expected = CASES[name]
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    fill = {k: v for k, v in files.items()}
    args = [a.format(**fill) for a in args]
    if command == "train":
        base = [] if args and args[0].endswith(".yaml") else SMALL + [f"logging.run_dir={tmp_path / 'run'}"]
        if not any(a.startswith("data.data_path=") for a in args) and not (args and args[0].endswith(".yaml")):
            base.append(f"data.data_path={files['prefix']}")
        args = [*args[:1], *base, *args[1:]] if args and args[0].endswith(".yaml") else [*base, *args]
    code = cli_main([command, *args])
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2, err[-3000:]
    assert "Traceback" not in err
    last = lines[-1]
    assert last.startswith(("moe-erc: error:", "preprocess: error:")), last
    assert expected.format(**fill) in last, last


@pytest.mark.parametrize("argv", [["--debug", "plan"], ["plan", "--debug"]])
def test_debug_goes_before_or_after_the_command(argv, capsys, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    assert cli_main([*argv, "configs/tiny.yaml", "--world-size", "1", "model.vocab_size=512", "--json"]) == 0
    assert '"world_size": 1' in capsys.readouterr().out
