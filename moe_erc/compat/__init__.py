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


# emerging-optimizers (megatron's Muon backend, optional) declares Python >= 3.12 for two reasons only:
# `typing.override` (a no-op decorator at run time) and an unconditional `import triton` in its GPU
# SYRK kernels, which its Newton-Schulz uses only when asked to (`use_syrk`, and only with triton 3.4).
_EO_SYRK = "emerging_optimizers.triton_kernels"


def _unavailable_syrk(*_args, **_kwargs):
    raise RuntimeError("emerging-optimizers' SYRK Newton-Schulz needs triton >= 3.4 and a CUDA GPU")


def ensure_importable() -> None:
    """Register the stand-ins megatron-core and emerging-optimizers need without triton / on Python 3.11.
    Idempotent, cheap."""
    import typing

    if not hasattr(typing, "override"):  # Python 3.11: PEP 698's decorator does nothing at run time
        typing.override = lambda fn: fn
    if importlib.util.find_spec("triton") is not None:
        return
    if _PAGED_STASH_OPS not in sys.modules:
        stub = types.ModuleType(_PAGED_STASH_OPS)
        stub.__doc__ = "moe-erc stand-in: triton is not installed (CPU machine)."
        stub.GLOBAL_BLOCK_SIZE = 1024
        stub.paged_stash_copy_kernel = _unavailable_kernel
        stub.paged_stash_pop_kernel = _unavailable_kernel
        sys.modules[_PAGED_STASH_OPS] = stub
    if _EO_SYRK not in sys.modules:
        stub = types.ModuleType(_EO_SYRK)
        stub.__doc__ = "moe-erc stand-in: triton is not installed, so the SYRK Newton-Schulz is off."
        stub.HAS_TRITON_340 = False
        stub.tsyrk_ex = stub.tsyrk_ex_small_matrix = _unavailable_syrk
        stub.__all__ = ["tsyrk_ex", "tsyrk_ex_small_matrix", "HAS_TRITON_340"]
        sys.modules[_EO_SYRK] = stub


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


def comm_device() -> torch.device:
    """Where tensors handed to collectives must live: the GPU under NCCL, the CPU under gloo."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
