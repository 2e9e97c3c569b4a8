"""Run under torchrun with 4 processes: every combined layout the configs use, in one launch.

argv: data prefix, output root, then one layout per argument as ``name:key=value,key=value`` (the
checkpoint to start from among them). For each layout a Trainer trains 2 steps into
``<output root>/<name>`` (metrics.jsonl as any run writes it); the process group stays up between layouts,
megatron's model-parallel groups are rebuilt for each.
"""

import sys

from moe_erc.training import parallel
from moe_erc.config import load_config
from moe_erc.training.trainer import Trainer

from megatron.core import parallel_state  # noqa: E402  (moe_erc made it importable)

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from launch import TINY  # noqa: E402


def main(prefix: str, out_root: str, *layouts: str) -> None:
    for layout in layouts:
        name, _, overrides = layout.partition(":")
        cfg = load_config(None, [*TINY, f"data.data_path={prefix}", f"logging.run_dir={out_root}/{name}",
                                 *[o for o in overrides.split(",") if o]])
        trainer = Trainer(cfg)
        try:
            trainer.train()
        finally:
            trainer.close()
            parallel_state.destroy_model_parallel()
    parallel.destroy()


if __name__ == "__main__":  # the checkpoint writer's helper process (spawned) imports this file too
    main(*sys.argv[1:])
