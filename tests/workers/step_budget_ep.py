"""Run under torchrun with 2 processes: count one ERC training step at EP=2 (moe_erc.commands.budget).

argv: data prefix, run directory. Prints one JSON line per rank: the StepCount as a dict.
"""

import json
import os
import sys

from moe_erc.commands.budget import budget_overrides, count_step
from moe_erc.config import load_config

if __name__ == "__main__":
    prefix, run_dir = sys.argv[1], sys.argv[2]
    # The scaled-down 3B shapes at 2 layers (a 2-process launch on 2 cores), experts split over 2 EP ranks.
    cfg = load_config(None, budget_overrides(run_dir, prefix) + [
        "model.num_layers=2", "erc.enabled=true", "parallel.expert_model_parallel_size=2",
        "training.global_batch_size=4"])
    count = count_step(cfg, warmup=1, label="erc/adamw EP=2")  # tears the process group down: rank from the env
    print(json.dumps({"rank": int(os.environ["RANK"]), **count.as_dict()}), flush=True)
