"""Run under torchrun with 2 processes: which checkpoint to resume is decided on rank 0 and broadcast.

Each rank is handed its own checkpoint root, as if a lagging shared filesystem showed the ranks different
steps; both must answer with rank 0's choice. Then rank 0 fails to find one: both raise its one-line error.
Prints one JSON line per rank: {"rank", "chosen", "error"}.
"""

import json
import sys
import tempfile
from pathlib import Path

import torch.distributed as dist

from moe_erc.training import checkpoint
from moe_erc.errors import CheckpointError


def fake_step(root: Path, step: int) -> None:
    step_dir = root / checkpoint.step_dir_name(step)
    step_dir.mkdir(parents=True)
    (step_dir / checkpoint.METADATA).write_text(json.dumps({"step": step}))
    (step_dir / "metadata.json").write_text("{}")
    (step_dir / ".metadata").write_bytes(b"")


def main() -> int:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    root = Path(tempfile.mkdtemp(prefix=f"rank{rank}-"))
    fake_step(root, 4 if rank == 0 else 6)  # rank 1 "sees" a newer step
    # verify() reads torch-DCP metadata; these fake steps have none, so decide on the directory listing.
    chosen = checkpoint.on_rank0(lambda: checkpoint._candidates(root)[0].name)
    try:
        checkpoint.on_rank0(lambda: checkpoint.resolve(root / "missing"))
        error = None
    except CheckpointError as exc:
        error = str(exc)
    for turn in range(dist.get_world_size()):  # one rank at a time: the lines share one stdout
        if turn == rank:
            print(json.dumps({"rank": rank, "chosen": chosen, "error": error}), flush=True)
        dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
