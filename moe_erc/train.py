"""``torchrun --nproc-per-node N -m moe_erc.train CONFIG [key=value ...]``: one rank of a training launch.

Kept free of heavy imports so the CLI can set up logging before megatron-core is loaded.
"""

import sys

from moe_erc.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
