"""``moe-erc`` command line: ``train``, ``preprocess``, ``report``, ``analyze``, ``plan``.

User mistakes (:class:`moe_erc.errors.UserError`) print one line, ``moe-erc: error: ...``, and exit
with code 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import warnings
from typing import Optional

from moe_erc.errors import UserError
from moe_erc.outputs import NO_SPACE, no_space_message

# Messages megatron-core and torch print on every CPU run that ask nothing of the user.
_NOISE = (
    "GPTModel IS DEPRECATED", "async save is deprecated", "full scope is deprecated",
    "MimoModelConfig is experimental", "CUDA_DEVICE_MAX_CONNECTIONS", "is deprecated. Please use `torch.distributed",
    "Transformer Engine and Apex are not installed", "Apex is not installed", "Transformer Engine is not installed",
)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in _NOISE)


def _quiet_third_party_noise() -> None:
    """Route library logging through one handler that drops :data:`_NOISE`; same for warnings."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_DropNoise())
    logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True)
    pattern = "|".join(re.escape(text) for text in _NOISE)
    warnings.filterwarnings("ignore", message=f".*({pattern})")
    if not _has_cuda():
        # megatron's jit_fuser is torch.compile: ~3 s of compilation per fused op and no gain on CPU.
        os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _train(args) -> int:
    from moe_erc.config import load_config
    from moe_erc.training.trainer import run

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        config, overrides = None, [config, *overrides]  # no file given: defaults + overrides
    cfg = load_config(config, overrides)
    run(cfg)
    return 0


def _preprocess(argv: list[str]) -> int:
    """Its own parser (Megatron-LM's preprocess_data.py flag names) gets the arguments untouched."""
    from moe_erc.data.preprocess import main as preprocess_main

    return preprocess_main(argv)


def _report(argv: list[str]) -> int:
    from moe_erc.commands.report import main as report_main

    return report_main(argv)


def _analyze(argv: list[str]) -> int:
    from moe_erc.commands.analyze import main as analyze_main

    return analyze_main(argv)


def _plan(argv: list[str]) -> int:
    from moe_erc.commands.plan import main as plan_main

    return plan_main(argv)


def _study(argv: list[str]) -> int:
    from moe_erc.commands.study import main as study_main

    return study_main(argv)


# Subcommands with their own argument parsers (argv after the command name is passed through).
def _export(argv: list[str]) -> int:
    from moe_erc.commands.export import main as export_main

    return export_main(argv)


def _import(argv: list[str]) -> int:
    from moe_erc.commands.hf_import import main as import_main

    return import_main(argv)


def _eval(argv: list[str]) -> int:
    from moe_erc.commands.evaluate import main as eval_main

    return eval_main(argv)


_PASSTHROUGH = {"preprocess": _preprocess, "report": _report, "analyze": _analyze, "plan": _plan, "study": _study,
                "export": _export, "import": _import, "eval": _eval}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-erc", description="MoE pre-training with the ERC loss.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model from a YAML config",
                           description="Train. Overrides look like training.train_iters=50 moe.num_experts=16.")
    train.add_argument("config", nargs="?", help="YAML config, e.g. configs/tiny.yaml (default: built-in defaults)")
    train.add_argument("overrides", nargs="*", help="section.key=value")
    train.add_argument("--debug", action="store_true", help="show full tracebacks")
    train.set_defaults(func=_train)

    # Listed for --help; their arguments are parsed by their own modules (see main()).
    sub.add_parser("preprocess", help="tokenize text/jsonl/parquet into Megatron .bin/.idx")
    sub.add_parser("report", help="figures + report.md from one or more run directories")
    sub.add_parser("analyze", help="post-hoc ERC loss, eps, norms and M heat-maps of a checkpoint")
    sub.add_parser("plan", help="parameters, memory per rank, FLOPs and ERC share of a config (meta device)")
    sub.add_parser("study", help="every method x seeds on configs/study.yaml, then docs/study/ (claims, figures)")
    sub.add_parser("export", help="a checkpoint as a Hugging Face transformers model directory (docs/export.md)")
    sub.add_parser("eval", help="lm-evaluation-harness tasks on a checkpoint -> RUN_DIR/eval/ (docs/import.md)")
    sub.add_parser("import", help="a Hugging Face MoE checkpoint as a moe-erc checkpoint + config (docs/import.md)")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    _quiet_third_party_noise()
    try:
        rest = [a for a in argv if a != "--debug"]  # --debug may come before or after the command
        if rest and rest[0] in _PASSTHROUGH:
            return _PASSTHROUGH[rest[0]](rest[1:])
        args = build_parser().parse_args(argv)
        return args.func(args)
    except UserError as exc:
        if debug:
            raise
        print(f"moe-erc: error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)
    except OSError as exc:
        if debug or exc.errno not in NO_SPACE:
            raise
        print(f"moe-erc: error: {no_space_message(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moe-erc: interrupted", file=sys.stderr)
        return 130



if __name__ == "__main__":
    sys.exit(main())
