"""Checkpoints with megatron-core ``dist_checkpointing``: resharding-capable, written atomically, verified.

Layout under the checkpoint root::

    step_0000100/        one dist_checkpointing directory per saved step (+ moe_erc.json)
    latest               text file naming the newest complete step directory

A step is written into ``.tmp-step_*``, renamed only when every rank has finished, and ``latest`` is
replaced last (write + ``os.replace``), so a crash mid-save leaves the previous checkpoint as ``latest``.
Before loading, :func:`verify` checks a step directory against its own metadata (every shard file present
and as long as the metadata says); ``resume=auto`` takes the newest step that verifies.

A checkpoint holds model, optimizer and scheduler state, router buffers (expert bias, K-Means centroids),
the trainer state (step, consumed samples: the data position), every rank's RNG states, and the run's
config. It loads into any TP/EP/PP/DP layout megatron-core can reshard; RNG states are restored only
into the layout they were saved from (same world size and TP/PP/EP/expert-TP sizes: elsewhere the
per-rank streams cannot mean the same thing). Which checkpoint to resume is decided on rank 0 and
broadcast, so ranks on a shared filesystem that lags cannot pick different steps.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from moe_erc.compat import comm_device, import_megatron, runtime_device
from moe_erc.errors import CheckpointError, UserError
from moe_erc.outputs import NO_SPACE, WriterLock
from moe_erc.training.orphans import install_checkpoint_queue

import_megatron()
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel  # noqa: E402
from megatron.core.dist_checkpointing.mapping import ShardedObject  # noqa: E402

LATEST = "latest"
METADATA = "moe_erc.json"
# Test hook (tests/training/test_reliability.py): "SECONDS@STEP" pauses the save of STEP after its shards are
# written and before the rename, after creating ``<root>/.save-paused``, so a test can SIGKILL mid-save.
PAUSE_ENV = "MOE_ERC_TEST_PAUSE_IN_SAVE"


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def _unwrap(chunk):
    """The GPTModel inside megatron's DDP wrapper (its keys, without a ``module.`` prefix)."""
    return getattr(chunk, "module", chunk)


def _rng_states() -> dict:
    # Only this rank's own GPU: get_rng_state_all() would open a CUDA context on every visible device.
    on_gpu = runtime_device() == "cuda"
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if on_gpu else None,
            "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}


def _set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    cuda_state = states.get("cuda")
    if isinstance(cuda_state, torch.Tensor) and runtime_device() == "cuda":
        torch.cuda.set_rng_state(cuda_state)
    tensor_parallel.get_cuda_rng_tracker().set_states(states["tracker"])


def _rng_object(data=None) -> ShardedObject:
    """One object per rank, keyed by rank: restorable only into the same world size."""
    return ShardedObject("rng_state", data, (dist.get_world_size(),), (dist.get_rank(),), replica_id=0)


def _sharded_state(model_chunks, optimizer, scheduler, trainer_state, with_optimizer, is_loading, rng=True):
    model_sd = _unwrap(model_chunks[0]).sharded_state_dict()
    state = {"model": model_sd, "trainer": trainer_state}
    if with_optimizer:
        metadata = {"distrib_optim_sharding_type": "dp_reshardable"}
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=metadata)
        state["scheduler"] = scheduler.state_dict()
    if rng:
        state["rng"] = _rng_object(None if is_loading else _rng_states())
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
    install_checkpoint_queue()  # megatron's writer helper process dies with this rank (moe_erc.training.orphans)
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    state = _sharded_state(model_chunks, optimizer, scheduler, trainer_state, with_optimizer, False)
    no_space = None
    try:
        dist_checkpointing.save(state, str(tmp))
        _disk_full_for_tests(step)
    except Exception as exc:  # noqa: BLE001 (dist_checkpointing wraps the OSError in its own exception types)
        no_space = _no_space(exc)
        if no_space is None:
            raise
    if _any_rank(no_space is not None):
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        raise DiskFullError(_disk_full_message(root, step, no_space or "another rank's shard"))
    dist.barrier()
    if rank == 0:
        meta = {"step": step, "with_optimizer": with_optimizer, "world_size": dist.get_world_size(),
                "layout": current_layout(),
                **{k: v for k, v in trainer_state.items() if isinstance(v, (int, float, str))}, **(describe or {})}
        (tmp / METADATA).write_text(json.dumps(meta, indent=1))
        _pause_for_tests(root, step)
        if final.exists():  # re-saving the same step (e.g. resumed then stopped at once)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_latest(root, final.name)
        _prune(root, keep_last)
    dist.barrier()
    return final


class DiskFullError(CheckpointError):
    """A checkpoint could not be written for want of space; the partial save is gone, the previous one intact."""


# Test hook (tests/training/test_faults.py): a save of this step fails as a full disk does, after its shards.
DISK_FULL_TEST_ENV = "MOE_ERC_TEST_DISK_FULL_AT_STEP"


def _disk_full_for_tests(step: int) -> None:
    if os.environ.get(DISK_FULL_TEST_ENV) in (str(step), "all"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "(test hook)")


def _no_space(exc: BaseException) -> Optional[str]:
    """The file a full disk or quota refused (as text) if that is what ``exc`` (or what it wraps) is, else None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in NO_SPACE:
            return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
        if "No space left on device" in str(exc) or "Disk quota exceeded" in str(exc):
            return str(exc).strip().splitlines()[0][:200]
        exc = exc.__cause__ or exc.__context__ or (exc.args[0] if exc.args and isinstance(exc.args[0], BaseException)
                                                   else None)
    return None


def _any_rank(flag: bool) -> bool:
    value = torch.tensor([int(flag)], device=comm_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def _disk_full_message(root: Path, step: int, what: str) -> str:
    steps = [p for p in step_dirs(root) if is_complete(p)]
    needed = _dir_bytes(steps[-1]) if steps else None
    free = shutil.disk_usage(root).free if root.exists() else 0
    previous = (f"the previous checkpoint {steps[-1].name} is intact and still latest" if steps
                else "there is no earlier checkpoint")
    need = f"about {needed / 2**30:.2f} GiB (the size of {steps[-1].name})" if needed else "more space"
    return (f"no space left to save checkpoint {step_dir_name(step)} under {root} ({what}): it needs {need}, "
            f"{free / 2**30:.2f} GiB are free; the partial save was removed and {previous}. Free space or set "
            f"checkpoint.dir elsewhere, then run the same command to resume (checkpoint.on_save_error=continue "
            f"trains on without saving)")


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _pause_for_tests(root: Path, step: int) -> None:
    seconds, _, at_step = os.environ.get(PAUSE_ENV, "").partition("@")
    if seconds and int(at_step or step) == step:
        (root / ".save-paused").write_text(str(os.getpid()))
        time.sleep(float(seconds))


def _write_latest(root: Path, name: str) -> None:
    tmp = root / f".{LATEST}.tmp"
    tmp.write_text(name + "\n")
    os.replace(tmp, root / LATEST)


def _prune(root: Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` steps, and never remove the newest step that verifies (if the kept ones
    are all damaged, it stays too)."""
    steps = step_dirs(root)
    kept, old = steps[-keep_last:], steps[:-keep_last]
    if old and not any(verify(p) is None for p in kept):
        loadable = [p for p in old if verify(p) is None]
        if loadable:
            old.remove(loadable[-1])
    for step_dir in old:
        shutil.rmtree(step_dir, ignore_errors=True)


def is_complete(step_dir: Path) -> bool:
    """A step directory that finished saving (renamed, with its metadata and megatron's)."""
    return (step_dir / METADATA).is_file() and (step_dir / "metadata.json").is_file()


def verify(step_dir: Path) -> Optional[str]:
    """None if ``step_dir`` is intact, else what is wrong (one line). Reads metadata only, no collectives."""
    if not step_dir.is_dir():
        return f"{step_dir} is not a directory"
    if not is_complete(step_dir):
        return f"{step_dir} is incomplete (no {METADATA} or metadata.json: the save did not finish)"
    try:
        json.loads((step_dir / METADATA).read_text())
        from torch.distributed.checkpoint import FileSystemReader

        storage = FileSystemReader(str(step_dir)).read_metadata().storage_data
    except Exception as exc:  # unreadable JSON / pickle: any parse error means corrupt metadata
        return f"{step_dir} has unreadable metadata ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
    needed: dict[str, int] = {}
    for info in storage.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in needed.items():
        path = step_dir / name
        if not path.is_file():
            return f"{step_dir} is missing shard file {name}"
        if path.stat().st_size < size:
            return f"{step_dir}/{name} is truncated ({path.stat().st_size} of {size} bytes)"
    return None


def _candidates(root: Path) -> list[Path]:
    """Step directories newest first, the one ``latest`` names at the front."""
    steps = step_dirs(root)[::-1]
    pointer = root / LATEST
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if named in steps:
            steps.remove(named)
            steps.insert(0, named)
    return steps


def step_dirs(root: str | Path) -> list[Path]:
    """Every ``step_*`` directory under ``root`` (complete or not), oldest first."""
    root = Path(root)
    return sorted(p for p in root.glob("step_*") if p.is_dir()) if root.is_dir() else []


def resume_point(root: str | Path, warn=print) -> Optional[Path]:
    """``training.resume=auto``: the newest step that verifies; None when ``root`` holds no step directory.
    When it holds some and none verifies, refuse (one line naming each and why): starting from step 0
    would overwrite them and rotate the older ones away."""
    found = find_latest(root, warn=warn)
    if found is None and step_dirs(root):
        problems = "; ".join(f"{p.name}: {verify(p).replace(str(p), '').strip()}" for p in step_dirs(root))
        raise CheckpointError(f"no checkpoint in {root} can be loaded ({problems}); nothing was changed. To start "
                              f"over, give a new logging.run_dir (or remove {root}); to load one anyway, name it "
                              f"with training.resume=<step dir>")
    return found


def find_latest(root: str | Path, warn=print) -> Optional[Path]:
    """The newest step directory that :func:`verify` accepts (``latest`` first); None if there is none.
    Broken ones are reported through ``warn`` and skipped."""
    for candidate in _candidates(Path(root)):
        problem = verify(candidate)
        if problem is None:
            return candidate
        warn(f"moe-erc: skipping checkpoint {candidate.name}: {problem}")
    return None


def resolve(path: str | Path) -> Path:
    """A checkpoint root (with ``latest``) or a step directory -> a verified step directory to load."""
    path = Path(path)
    if (path / METADATA).is_file():
        problem = verify(path)
        if problem:
            raise CheckpointError(f"cannot load checkpoint, it is damaged: {problem}")
        return path
    found = find_latest(path) if path.is_dir() else None
    if found is None:
        raise CheckpointError(f"no complete checkpoint in {path}; point at a step_* directory or a "
                              f"checkpoint root with a 'latest' file")
    return found


def read_metadata(step_dir: Path) -> dict[str, Any]:
    return json.loads((Path(step_dir) / METADATA).read_text())


def _first_cause(exc: BaseException) -> str:
    """The innermost useful line of a (possibly per-rank wrapped) loading error."""
    failures = getattr(exc, "failures", None)  # torch DCP CheckpointException: {rank: exception}
    if failures:
        exc = next(iter(failures.values()))  # (exception, traceback) in torch 2.x
        exc = exc[0] if isinstance(exc, tuple) else exc
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {(lines or [''])[-1][:200]}"


def _load_failure(step_dir: Path, first: str) -> str:
    """One line: damaged files, or a checkpoint that does not fit this model/layout."""
    problem = verify(step_dir)
    if problem:
        return f"checkpoint {step_dir} is damaged: {problem}"
    if any(word in first.lower() for word in ("shape", "size mismatch", "missing", "unexpected", "not found")):
        return (f"cannot load {step_dir} into this model/layout ({first}); check that the config matches the one "
                f"it was saved with")
    return (f"cannot load {step_dir} ({first}): its files look complete but do not decode, so the checkpoint is "
            f"probably damaged (or written by another version); resume from an earlier step_* directory")


def current_layout() -> dict[str, int]:
    """This run's parallel layout: world size and TP / PP / EP / expert-TP sizes."""
    return {"world_size": dist.get_world_size(),
            "tensor_model_parallel_size": parallel_state.get_tensor_model_parallel_world_size(),
            "pipeline_model_parallel_size": parallel_state.get_pipeline_model_parallel_world_size(),
            "expert_model_parallel_size": parallel_state.get_expert_model_parallel_world_size(),
            "expert_tensor_parallel_size": parallel_state.get_expert_tensor_parallel_world_size()}


def saved_layout(meta: dict) -> Optional[dict[str, int]]:
    """The layout a checkpoint was saved with (older checkpoints: rebuilt from their config), or None."""
    if "layout" in meta:
        return meta["layout"]
    parallel, world = (meta.get("config") or {}).get("parallel"), meta.get("world_size")
    if not parallel or world is None:
        return None
    tp = parallel.get("tensor_model_parallel_size", 1)
    return {"world_size": world, "tensor_model_parallel_size": tp,
            "pipeline_model_parallel_size": parallel.get("pipeline_model_parallel_size", 1),
            "expert_model_parallel_size": parallel.get("expert_model_parallel_size", 1),
            "expert_tensor_parallel_size": parallel.get("expert_tensor_parallel_size") or tp}


def on_rank0(decide):
    """``decide()`` on rank 0, its result (or its one-line error, of the same :class:`UserError` class) broadcast
    to every rank."""
    answer = [None]
    if dist.get_rank() == 0:
        try:
            answer = [("ok", decide())]
        except UserError as exc:
            answer = [(type(exc), str(exc))]
    dist.broadcast_object_list(answer, src=0)
    kind, value = answer[0]
    if kind != "ok":
        raise kind(value)
    return value


RUN_LOCK = ".moe-erc.lock"


def prepare_run_dir(cfg, run_dir: Path, ckpt_dir: Path, say=print) -> Optional[WriterLock]:
    """Collective. Take the run directory's writer lock (rank 0; :class:`moe_erc.outputs.WriterLock`), create it
    and write its ``config.yaml``; first refuse (every rank, one line) a second writer, and a fresh run where an
    earlier one left its records, so they are never mixed or overwritten. Returns the lock on rank 0."""
    lock = []

    def decide():
        try:
            lock.append(WriterLock(run_dir / RUN_LOCK, f"run directory {run_dir}",
                                   "give a new logging.run_dir").acquire(say=say))
        except UserError as exc:
            return str(exc)
        except OSError as exc:
            return f"cannot write run directory {run_dir} ({exc.strerror}); set logging.run_dir to a writable path"
        return _used_run_dir(cfg, run_dir, ckpt_dir)

    refusal = on_rank0(decide)
    if refusal:
        for held in lock:  # taken, then the directory refused for another reason
            held.release()
        raise UserError(refusal)
    if dist.get_rank() == 0:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(cfg.to_yaml())
        except OSError as exc:
            raise UserError(f"cannot write run directory {run_dir} ({exc.strerror}); "
                            f"set logging.run_dir to a writable path") from None
    dist.barrier()
    return lock[0] if lock else None


def _used_run_dir(cfg, run_dir: Path, ckpt_dir: Path) -> Optional[str]:
    """Why this run must not start here (None if it may): a fresh start (``training.resume=none``, or ``auto`` with
    nothing to resume) in a directory holding another run's metrics or checkpoints."""
    resume = cfg.training.resume
    if resume not in ("auto", "none"):
        return None  # an explicit checkpoint: continuing that run here is the user's stated choice
    steps = step_dirs(ckpt_dir)
    metrics = run_dir / "metrics.jsonl"
    has_records = metrics.is_file() and metrics.stat().st_size > 0
    if resume == "auto" and steps:  # resumes from the newest good one; refuses now if none would load
        try:
            resume_point(ckpt_dir, warn=lambda _: None)
        except CheckpointError as exc:
            return str(exc)
        return None
    if not steps and not has_records:
        return None
    held = ", ".join(filter(None, [f"{metrics.name}" if has_records else "",
                                   f"checkpoints {steps[0].name}..{steps[-1].name}" if steps else ""]))
    why = ("training.resume=none would start a new run" if resume == "none"
           else "there is no checkpoint to resume, so a new run would start")
    return (f"{run_dir} holds an earlier run ({held}); {why} and mix its records into it. "
            f"Give a new logging.run_dir, or remove {run_dir} to start over there")


def restore(cfg, ckpt_dir: Path, model_chunks, optimizer, scheduler, say=print) -> dict:
    """Collective. The state a run starts from: ``training.resume`` (``auto``: the newest loadable step under
    ``ckpt_dir``; or a named checkpoint) restores everything, else ``checkpoint.load`` only the weights.
    Returns the trainer state (``step``, ``consumed_samples``; empty for a fresh start). Which checkpoint is
    decided on rank 0 and broadcast: on a shared filesystem ranks could otherwise see different steps."""
    from moe_erc.training.optimizer import schedule_changes

    source: Optional[Path] = None
    if cfg.training.resume == "auto":
        source = on_rank0(lambda: resume_point(ckpt_dir, warn=print))
    elif cfg.training.resume != "none":
        source = on_rank0(lambda: resolve(cfg.training.resume))
    if source is not None:
        state = load(source, model_chunks, optimizer, scheduler)
        step = int(state.get("step", 0))
        rng = "RNG states restored" if state.get("restored_rng") else "RNG states not restored: saved in another layout"
        say(f"resumed from {source} at step {step} ({rng})")
        changes = schedule_changes(state.get("config") or {}, cfg)
        if changes:
            say(f"moe-erc: the LR/WD schedule follows this config, which differs from the checkpoint's "
                f"({'; '.join(changes)}); the learning rate continues from step {step} on the new schedule")
        return {"step": step, "consumed_samples": int(state.get("consumed_samples", 0))}
    if cfg.checkpoint.load:
        step_dir = on_rank0(lambda: resolve(cfg.checkpoint.load))
        load(step_dir, model_chunks)
        say(f"initialised weights from {step_dir}")
    return {}


def load(step_dir: str | Path, model_chunks, optimizer=None, scheduler=None) -> dict:
    """Collective. Loads model weights, and optimizer + scheduler (+ RNG in the same layout) when given.
    Returns the trainer state."""
    step_dir = Path(step_dir)
    meta = read_metadata(step_dir)
    with_optimizer = optimizer is not None and meta.get("with_optimizer", False)
    same_layout = saved_layout(meta) == current_layout()
    template = _sharded_state(model_chunks, optimizer, scheduler, {}, with_optimizer, True,
                              rng=with_optimizer and same_layout)
    template.pop("trainer")
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # torch DCP's notes on every load (single-process mode, argument order, ShardedTensor deprecation)
            warnings.filterwarnings("ignore", module=r"torch\.distributed\.checkpoint")
            state = dist_checkpointing.load(template, str(step_dir))
        _unwrap(model_chunks[0]).load_state_dict(state["model"], strict=True)
    except (CheckpointError, KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # torch DCP wraps rank failures in CheckpointException(BaseException)
        raise CheckpointError(_load_failure(step_dir, _first_cause(exc))) from None
    if with_optimizer:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    if "rng" in state and state["rng"] is not None:
        _set_rng_states(state["rng"])
    trainer_state = dist_checkpointing.load_common_state_dict(str(step_dir)).get("trainer", {})
    return {**meta, **trainer_state, "loaded_optimizer": with_optimizer, "restored_rng": "rng" in state}


@contextlib.contextmanager
def one_process_model(path: str | Path, check=None):
    """Yield ``(cfg, net, meta)``: the checkpoint's model built in this process (fp32, CPU) with its weights,
    whatever layout it was saved in (``export``, ``analyze``, ``eval``). ``check(cfg)`` runs before anything is
    built (to refuse early)."""
    from moe_erc.config import Config
    from moe_erc.model import gpt
    from moe_erc.training import parallel

    step_dir = resolve(path)
    meta = read_metadata(step_dir)
    if "config" not in meta:
        raise CheckpointError(f"{step_dir} has no saved config (written by an older moe-erc); cannot rebuild it")
    cfg = parallel.one_process_config(Config.model_validate(meta["config"]))
    cfg = cfg.model_copy(update={"training": cfg.training.model_copy(update={"precision": "fp32"})})
    if check is not None:
        check(cfg)
    with parallel.one_process(cfg, "cpu"):
        net = gpt.build_model(cfg, gpt.transformer_config(cfg), meta["padded_vocab_size"])
        load(step_dir, [net])
        net.eval()
        yield cfg, net, {**meta, "step_dir": str(step_dir)}
