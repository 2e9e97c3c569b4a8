"""Worked example: start from a Hugging Face MoE, continue pre-training with ERC, export, evaluate (docs/import.md).

    python scripts/import_example.py [--out runs/import-example] [--steps 50]

1. a small random Qwen3-MoE (the OLMoE recipe in miniature: fine-grained experts, top-K, QK-norm, no shared
   expert; OLMoE itself is refused by `moe-erc import`: its QK norm spans the whole projection) is written with
   transformers, with the embedded corpus's tokenizer, as a stand-in for a downloaded checkpoint;
2. `moe-erc import` turns it into a checkpoint and a config;
3. `moe-erc train` continues from it with ERC on, on the embedded corpus;
4. `moe-erc export` writes the trained model for transformers;
5. `moe-erc eval` runs a local multiple-choice task on it with lm-evaluation-harness (offline), and
   `moe-erc report` shows the run with its downstream column.
Everything stays under --out; nothing touches the network.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

QUESTIONS = [("To be, or not to", [" be", " go", " king"], 0), ("My lord, I", [" will", " blue", " seven"], 0),
             ("Enter the", [" King", " seven", " blue"], 0), ("What is your", [" name", " of", " and"], 0)]


def moe_erc(*args: str) -> None:
    """``moe-erc ARGS``, in this process (the commands a user would type, without re-importing torch each time)."""
    from moe_erc.cli import main as cli

    print("$ moe-erc " + " ".join(args), flush=True)
    code = cli(list(args))
    if code:
        sys.exit(f"import_example: moe-erc {args[0]} failed ({code})")


def random_hf_model(out: Path, tokenizer_json: str, vocab: int) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.Qwen3MoeConfig(
        vocab_size=vocab, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, intermediate_size=256, moe_intermediate_size=64, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=True, max_position_embeddings=128, tie_word_embeddings=False, rms_norm_eps=1e-6)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(str(out))
    shutil.copy(tokenizer_json, out / "tokenizer.json")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/import-example")
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        sys.exit(f"import_example: {out} is not empty; pass another --out")
    from moe_erc.commands.evaluate import write_choice_task
    from moe_erc.data.corpus import EMBEDDED_DATA_DIR, prepare_embedded_corpus

    prefix = prepare_embedded_corpus(EMBEDDED_DATA_DIR, vocab_size=8192)
    random_hf_model(out / "hf-random", f"{prefix}.tokenizer.json", 8192)
    moe_erc("import", str(out / "hf-random"), "--out", str(out / "imported"))
    moe_erc("train", str(out / "imported" / "config.yaml"), f"checkpoint.load={out / 'imported'}", "erc.enabled=true",
            f"training.train_iters={args.steps}", "training.micro_batch_size=4", "training.global_batch_size=8",
            "model.seq_length=128", f"training.eval_interval={args.steps}", "training.eval_iters=2",
            f"checkpoint.save_interval={args.steps}", f"logging.run_dir={out / 'run'}", "logging.progress=false",
            "logging.tensorboard=false")
    moe_erc("export", str(out / "run" / "checkpoints"), "--out", str(out / "hf-trained"))
    moe_erc("eval", str(out / "run" / "checkpoints"), "--tasks", "shakespeare_mc",
            "--include-path", str(write_choice_task(out / "tasks", "shakespeare_mc", QUESTIONS)),
            "--hf-dir", str(out / "hf-trained"))
    moe_erc("report", str(out / "run"), "--out", str(out / "report"))
    print(f"import_example: done; see {out / 'report' / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
