"""Process groups and seeds: torch.distributed + megatron-core parallel state from the config.

Works the same under ``torchrun`` (reads RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT), SLURM
(``srun`` sets SLURM_PROCID/SLURM_NTASKS; MASTER_ADDR/PORT come from the sbatch script) and a plain
single process (a private TCP store on localhost). Backend: NCCL on GPU, gloo on CPU.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import random
import socket
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from moe_erc.compat import import_megatron, prepare_runtime
from moe_erc.config import Config, check_layout

import_megatron()
from megatron.core import parallel_state, tensor_parallel  # noqa: E402


@dataclass(frozen=True)
class Topology:
    """This process's place in the layout."""

    rank: int
    world_size: int
    local_rank: int
    tp_rank: int
    pp_rank: int
    ep_rank: int
    dp_rank: int
    dp_size: int

    @property
    def is_logging_rank(self) -> bool:
        """The last rank holds the loss (last pipeline stage); it logs."""
        return self.rank == self.world_size - 1


def launch_environment() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun or SLURM variables; (0, 1, 0) otherwise."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rendezvous_store(rank: int, world_size: int) -> dist.Store:
    """The key-value store the process group meets in, with this launch attempt's keys under their own prefix.

    Under torchrun the store is the elastic agent's (``TORCHELASTIC_USE_AGENT_STORE``: workers are clients)
    and it outlives the workers: after a crash, ``--max-restarts`` starts new workers against the same store,
    and without a per-attempt prefix they read the dead workers' addresses (gloo: "Connection refused" in
    ``connectFullMesh``; NCCL: a stale unique id). ``TORCHELASTIC_RESTART_COUNT`` names the attempt.
    One process (no launcher): a private store on a free local port, never a launcher's inherited one.
    """
    if world_size == 1:
        host, port, is_server = "127.0.0.1", _free_port(), True
    else:
        host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        is_server = rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
    store = dist.TCPStore(host, port, world_size, is_server, timeout=STORE_TIMEOUT)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"moe_erc/attempt{attempt}", store)


STORE_TIMEOUT = datetime.timedelta(minutes=30)  # torch's default process-group timeout


def initialize(cfg: Config, device: str) -> Topology:
    """Start torch.distributed (if needed) and megatron's parallel groups; seed every RNG."""
    rank, world_size, local_rank = launch_environment()
    check_layout(cfg, world_size, device)
    if not dist.is_initialized():
        if device == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo", rank=rank,
                                world_size=world_size, store=rendezvous_store(rank, world_size))
    p = cfg.parallel
    tp = p.tensor_model_parallel_size
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        expert_model_parallel_size=p.expert_model_parallel_size,
        expert_tensor_parallel_size=p.expert_tensor_parallel_size or tp,
    )
    set_seed(cfg.training.seed)
    return topology()


def topology() -> Topology:
    rank, world_size, local_rank = dist.get_rank(), dist.get_world_size(), launch_environment()[2]
    return Topology(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        ep_rank=parallel_state.get_expert_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
    )


def compute_device(device: str) -> torch.device:
    """The device this rank computes on: its GPU (set from LOCAL_RANK by :func:`initialize`) or the CPU."""
    if device == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def set_seed(seed: int) -> None:
    """Seed python/numpy/torch and megatron's tracker (TP-, EP- and PP-aware streams).

    Pipeline stages get different seeds (as in Megatron-LM) so their layers are not initialised alike.
    """
    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy() -> None:
    """Tear down megatron's groups, its per-layer MoE metrics, and the default process group."""
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    get_moe_metrics_tracker().metrics.clear()  # entries are sized for this model's layers
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def one_process_config(cfg: Config) -> Config:
    """``cfg`` laid out for one process: no TP / PP / EP, one micro-batch per step (a model's parameters keep
    their shapes: a checkpoint of any layout loads into it)."""
    layout = {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1, "expert_model_parallel_size": 1,
              "expert_tensor_parallel_size": None, "sequence_parallel": None, "use_distributed_optimizer": False,
              "world_size": None}
    return cfg.model_copy(update={
        "parallel": cfg.parallel.model_copy(update=layout),
        "training": cfg.training.model_copy(update={"global_batch_size": cfg.training.micro_batch_size}),
    })


@contextlib.contextmanager
def one_process(cfg: Config, device: str = "cpu"):
    """Parallel state for ``cfg`` in this one process (``device``: ``cpu`` applies the CPU patches), torn down
    on exit. For the commands and tools that build a model outside a training run."""
    topo = initialize(cfg, prepare_runtime(device))
    try:
        yield topo
    finally:
        destroy()
