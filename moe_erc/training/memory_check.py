"""Refuse, before allocating, a run whose model and optimizer cannot fit in the memory this process can have.

The estimate is the planner's (:mod:`moe_erc.model.memory`: weights, fp32 gradients, AdamW state, activations of
the micro-batches in flight) for this rank's exact parameters, counted on a copy of the model built on the meta
device (no memory). What the process can have: free GPU memory on CUDA (``torch.cuda.mem_get_info``); on CPU the
host's available memory (``MemAvailable``, or the cgroup's limit if lower) shared by the ranks on this host.
``training.memory_check=false`` skips it (an estimate errs; the OOM killer does not).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Optional

import torch

from moe_erc.config import Config, data_parallel_size, expert_data_parallel_size
from moe_erc.errors import ConfigError
from moe_erc.model.memory import BYTES, GiB, activation_bytes, state_bytes

# Test hook (tests/training/test_faults.py): pretend this process can have this many bytes.
AVAILABLE_TEST_ENV = "MOE_ERC_TEST_AVAILABLE_BYTES"


def available_bytes(device: str) -> tuple[int, str]:
    """(bytes this process can allocate, where the figure comes from)."""
    if os.environ.get(AVAILABLE_TEST_ENV):
        return int(os.environ[AVAILABLE_TEST_ENV]), "test hook"
    if device == "cuda":
        free, _total = torch.cuda.mem_get_info()
        return free, f"free on GPU {torch.cuda.current_device()}"
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    host, source = _host_available()
    return host // ranks, f"{source}{f', shared by {ranks} ranks on this host' if ranks > 1 else ''}"


def _host_available() -> tuple[int, str]:
    available, source = None, "host memory"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available, source = int(line.split()[1]) * 1024, "MemAvailable"
    except OSError:
        pass
    limit = _cgroup_room()
    if limit is not None and (available is None or limit < available):
        available, source = limit, "the cgroup's memory limit"
    if available is None:
        import psutil

        available = psutil.virtual_memory().available
    return available, source


def _cgroup_room() -> Optional[int]:
    """The cgroup v2 (or v1) limit minus current usage, when a limit is set."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_file).read_text().strip()
            if limit == "max" or int(limit) >= 1 << 60:
                return None
            return int(limit) - int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
    return None


def estimate(cfg: Config, tf_config, vocab_size: int, world_size: int, precision: str) -> dict[str, float]:
    """Bytes this rank will need: its parameters counted on a meta-device copy of the model it will build."""
    from moe_erc.model.gpt import build_model
    from moe_erc.model.layers.kernels import local_spec_only
    from moe_erc.training.checkpoint import _rng_states, _set_rng_states

    probe_config = copy.copy(tf_config)
    # No initialisation, no explicit-device allocation (megatron's linears allocate on the current GPU unless
    # use_cpu_initialization; then on the default device: meta), local modules (counts equal TE's, as plan's).
    probe_config.perform_initialization = False
    probe_config.use_cpu_initialization = True
    probe_config.moe_grouped_gemm = False
    probe_config.gradient_accumulation_fusion = False
    rng = _rng_states()  # the real model's initialisation must not see that a probe was built first
    with torch.device("meta"), local_spec_only():
        probe = build_model(cfg, probe_config, vocab_size)
    _set_rng_states(rng)
    dense = sum(p.numel() for p in probe.parameters() if getattr(p, "allreduce", True))
    experts = sum(p.numel() for p in probe.parameters()) - dense
    del probe
    p = cfg.parallel
    dp = data_parallel_size(cfg, world_size)
    state = state_bytes(dense, experts, BYTES[precision], dp, expert_data_parallel_size(cfg, world_size))
    optimizer = state["optimizer_distributed"] if p.use_distributed_optimizer else state["optimizer"]
    # activation_bytes is per pipeline stage already (the layers of one stage, micro-batches in flight)
    return {"weights": state["weights"], "gradients": state["gradients"], "optimizer": optimizer,
            "activations": activation_bytes(cfg) * (2 if precision == "fp32" else 1)}


def check_fits(cfg: Config, tf_config, vocab_size: int, world_size: int, precision: str, device: str) -> None:
    """:class:`ConfigError` (one line, both figures) when the estimate exceeds what this process can have."""
    if not cfg.training.memory_check:
        return
    try:
        need = estimate(cfg, tf_config, vocab_size, world_size, precision)
    except ConfigError:  # a combination only transformer-engine's modules build: the real build decides
        return
    have, source = available_bytes(device)
    total = sum(need.values())
    if total > have:
        parts = ", ".join(f"{name} {value / GiB:.2f}" for name, value in need.items())
        raise ConfigError(f"the model does not fit: this rank needs about {total / GiB:.2f} GiB ({parts}; moe-erc "
                          f"plan's estimate) but can have {have / GiB:.2f} GiB ({source}); spread it over more "
                          f"devices (TP / EP / PP, the distributed optimizer), shrink it or its micro-batch, or set "
                          f"training.memory_check=false if you know better")
