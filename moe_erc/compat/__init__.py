"""Make megatron-core importable and runnable where it was not built to run.

Nothing else in moe-erc needs to know about this package: call :func:`import_megatron` (or
:func:`ensure_importable`) before the first ``import megatron.core``; :func:`prepare_runtime` applies
the CPU patches when no CUDA device is present and does nothing on a GPU machine.
"""

from __future__ import annotations

import importlib.util
import sys
import types

import torch

# megatron-core 0.19.2 imports `triton` unconditionally from this one module (GPU paged-stash kernels,
# used only with `moe_paged_stash=True`). Installing triton costs ~1 GB on a CPU machine, so when it is
# absent we register an inert stand-in for that single module, not a fake `triton`: megatron's other
# triton users guard their imports with try/except and must keep seeing triton as missing.
_PAGED_STASH_OPS = "megatron.core.transformer.moe.ops.paged_stash"


def _unavailable_kernel(*_args, **_kwargs):
    raise RuntimeError("MoE paged stash needs triton and a CUDA GPU (moe_paged_stash is GPU-only)")


def ensure_importable() -> None:
    """Register the paged-stash stand-in if triton is missing. Idempotent, cheap."""
    if _PAGED_STASH_OPS in sys.modules or importlib.util.find_spec("triton") is not None:
        return
    stub = types.ModuleType(_PAGED_STASH_OPS)
    stub.__doc__ = "moe-erc stand-in: triton is not installed (CPU machine)."
    stub.GLOBAL_BLOCK_SIZE = 1024
    stub.paged_stash_copy_kernel = _unavailable_kernel
    stub.paged_stash_pop_kernel = _unavailable_kernel
    sys.modules[_PAGED_STASH_OPS] = stub


def import_megatron():
    """``import megatron.core`` after :func:`ensure_importable`; returns the module."""
    ensure_importable()
    import megatron.core

    return megatron.core


def prepare_runtime(device: str | None = None) -> str:
    """Pick the device (``cuda`` if available, else ``cpu``) and patch megatron-core for CPU if needed."""
    import_megatron()
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        from moe_erc.errors import ConfigError

        raise ConfigError(f"training.device=cuda but this torch ({torch.__version__}) sees no CUDA device; "
                          f"install a CUDA build of torch on a GPU machine, or set training.device=cpu")
    if device == "cpu":
        from moe_erc.compat import cpu

        cpu.apply()
    _RUNTIME["device"] = device
    return device


_RUNTIME: dict = {"device": None}


def runtime_device() -> str:
    """The device :func:`prepare_runtime` chose (``cuda`` or ``cpu``); before it runs, ``cuda`` if present.

    Model code allocates where megatron-core does: on the current GPU, or on the CPU (also when a GPU
    machine runs with ``training.device=cpu``).
    """
    return _RUNTIME["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
