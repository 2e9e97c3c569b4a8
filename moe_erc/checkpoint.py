"""Checkpoints with megatron-core ``dist_checkpointing``: resharding-capable, written atomically.

Layout under the checkpoint root::

    step_0000100/        one dist_checkpointing directory per saved step (+ moe_erc.json)
    latest               text file naming the newest complete step directory

A step is written into ``.tmp-step_*`` and renamed only when every rank has finished, then ``latest``
is replaced atomically, so a crash mid-save leaves the previous checkpoint as ``latest``. A checkpoint
saved with one parallel layout loads into any other (TP/EP/PP/DP), as dist_checkpointing reshards.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from moe_erc.compat import import_megatron
from moe_erc.errors import CheckpointError

import_megatron()
from megatron.core import dist_checkpointing  # noqa: E402

LATEST = "latest"
METADATA = "moe_erc.json"


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def _unwrap(chunk):
    """The GPTModel inside megatron's DDP wrapper (its keys, without a ``module.`` prefix)."""
    return getattr(chunk, "module", chunk)


def _sharded_state(model_chunks, optimizer, scheduler, trainer_state, with_optimizer, is_loading):
    model_sd = _unwrap(model_chunks[0]).sharded_state_dict()
    state = {"model": model_sd, "trainer": trainer_state}
    if with_optimizer:
        metadata = {"distrib_optim_sharding_type": "dp_reshardable"}
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=metadata)
        state["scheduler"] = scheduler.state_dict()
    return state


def save(root: str | Path, step: int, model_chunks, optimizer, scheduler, trainer_state: dict,
         with_optimizer: bool = True, keep_last: int = 2, describe: Optional[dict] = None) -> Path:
    """Collective: every rank calls it. Returns the final step directory.

    ``describe`` (JSON-able: the run's config, the padded vocabulary) is stored in ``moe_erc.json`` so a
    checkpoint can be rebuilt and analysed without its run directory.
    """
    root = Path(root)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}"
    rank = dist.get_rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    state = _sharded_state(model_chunks, optimizer, scheduler, trainer_state, with_optimizer, False)
    dist_checkpointing.save(state, str(tmp))
    dist.barrier()
    if rank == 0:
        meta = {"step": step, "with_optimizer": with_optimizer, "world_size": dist.get_world_size(),
                **{k: v for k, v in trainer_state.items() if isinstance(v, (int, float, str))}, **(describe or {})}
        (tmp / METADATA).write_text(json.dumps(meta, indent=1))
        if final.exists():  # re-saving the same step (e.g. resumed then stopped at once)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_latest(root, final.name)
        _prune(root, keep_last)
    dist.barrier()
    return final


def _write_latest(root: Path, name: str) -> None:
    tmp = root / f".{LATEST}.tmp"
    tmp.write_text(name + "\n")
    os.replace(tmp, root / LATEST)


def _prune(root: Path, keep_last: int) -> None:
    steps = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in steps[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def is_complete(step_dir: Path) -> bool:
    """A step directory that finished saving (renamed, with metadata and megatron's own metadata)."""
    return (step_dir / METADATA).is_file() and (step_dir / "metadata.json").is_file()


def find_latest(root: str | Path) -> Optional[Path]:
    """The step directory ``latest`` names, else the newest complete one; None if there is none."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if is_complete(candidate):
            return candidate
    complete = [p for p in sorted(root.glob("step_*")) if is_complete(p)]
    return complete[-1] if complete else None


def resolve(path: str | Path) -> Path:
    """A checkpoint root (with ``latest``) or a step directory -> the step directory to load."""
    path = Path(path)
    if is_complete(path):
        return path
    found = find_latest(path) if path.is_dir() else None
    if found is None:
        raise CheckpointError(f"no complete checkpoint in {path}; point at a step_* directory or a "
                              f"checkpoint root with a 'latest' file")
    return found


def read_metadata(step_dir: Path) -> dict[str, Any]:
    return json.loads((Path(step_dir) / METADATA).read_text())


def load(step_dir: str | Path, model_chunks, optimizer=None, scheduler=None) -> dict:
    """Collective. Loads model weights, and optimizer + scheduler when given. Returns the trainer state."""
    step_dir = Path(step_dir)
    meta = read_metadata(step_dir)
    with_optimizer = optimizer is not None and meta.get("with_optimizer", False)
    template = _sharded_state(model_chunks, optimizer, scheduler, {}, with_optimizer, True)
    template.pop("trainer")
    with torch.no_grad():
        state = dist_checkpointing.load(template, str(step_dir))
    _unwrap(model_chunks[0]).load_state_dict(state["model"], strict=True)
    if with_optimizer:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    trainer_state = dist_checkpointing.load_common_state_dict(str(step_dir)).get("trainer", {})
    return {**meta, **trainer_state, "loaded_optimizer": with_optimizer}
