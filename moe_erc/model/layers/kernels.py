"""Optional fused kernels: which ones this machine can run, decided in one place.

megatron-core has a switch per fused kernel, and each needs something that a plain CUDA build of PyTorch
may not have: apex's or megatron's compiled CUDA extensions, transformer-engine, or triton for
``torch.compile``. A switch left on without its kernel fails at the first forward pass (e.g.
``No module named 'scaled_masked_softmax_cuda'``). :func:`detect` turns a switch on only when what it
needs imports here, and :meth:`Kernels.summary` is the line the start-up banner prints.

| switch (TransformerConfig) | needs |
|---|---|
| ``masked_softmax_fusion`` | the ``scaled_*softmax_cuda`` extensions (apex / megatron's compiled ops) |
| ``apply_rope_fusion`` | transformer-engine (megatron's fused RoPE is TE's) |
| ``bias_activation_fusion``, ``bias_dropout_fusion``, ``cross_entropy_loss_fusion`` | triton (megatron fuses these with ``torch.compile``) |
| ``gradient_accumulation_fusion`` | apex's ``fused_weight_gradient_mlp_cuda`` |
| ``moe_permute_fusion`` | transformer-engine >= 2.1 (megatron's ``fused_permute``) |

Everything is off on CPU and when ``training.fused_kernels=false``. Without any of them the unfused
PyTorch paths run, which are the reference implementation.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from dataclasses import dataclass, fields

import torch

from moe_erc.compat import runtime_device

_SOFTMAX_EXTENSIONS = ("scaled_masked_softmax_cuda", "scaled_upper_triang_masked_softmax_cuda",
                       "scaled_softmax_cuda")


def _imports(module: str) -> bool:
    """True when ``module`` imports (any failure, e.g. a missing CUDA library, counts as absent)."""
    try:
        importlib.import_module(module)
    except Exception:
        return False
    return True


_LOCAL_ONLY = []  # inside local_spec_only()


def have_transformer_engine() -> bool:
    """transformer-engine's PyTorch API imports and this run computes on a GPU (GPU images only)."""
    return (not _LOCAL_ONLY and runtime_device() == "cuda" and torch.cuda.is_available()
            and _imports("transformer_engine.pytorch"))


@contextlib.contextmanager
def local_spec_only():
    """Build with megatron's local modules even where transformer-engine imports: a meta-device copy of the
    model for counting (TE's modules allocate on the GPU whatever the default device; the counts are equal)."""
    _LOCAL_ONLY.append(True)
    try:
        yield
    finally:
        _LOCAL_ONLY.pop()


def have_nvidia_apex() -> bool:
    """NVIDIA apex (NGC images). The unrelated PyPI package named ``apex`` has no ``apex.optimizers``."""
    return _imports("apex.optimizers")


def _have_te_permute() -> bool:
    try:
        from megatron.core.transformer.moe import moe_utils
    except Exception:
        return False
    return all(getattr(moe_utils, name, None) is not None
               for name in ("fused_permute", "fused_permute_with_probs", "fused_unpermute",
                            "fused_sort_chunks_by_index", "fused_sort_chunks_by_index_with_probs"))


def _torch_compile_works() -> bool:
    """megatron's ``jit_fuser`` is ``torch.compile``; on a GPU inductor needs triton."""
    return _imports("triton") and os.environ.get("TORCH_COMPILE_DISABLE", "0") in ("", "0")


@dataclass(frozen=True)
class Kernels:
    """One flag per optional kernel; True = megatron is told to use it."""

    transformer_engine: bool = False
    apex: bool = False
    masked_softmax: bool = False
    rope: bool = False
    bias_activation: bool = False
    bias_dropout: bool = False
    cross_entropy: bool = False
    grad_accumulation: bool = False
    permute: bool = False

    def summary(self) -> str:
        """``"kernels on: a, b | off: c"`` for the banner."""
        on = [f.name.replace("_", "-") for f in fields(self) if getattr(self, f.name)]
        off = [f.name.replace("_", "-") for f in fields(self) if not getattr(self, f.name)]
        return f"kernels on: {', '.join(on) or 'none'} | off: {', '.join(off) or 'none'}"

    def optimizer(self) -> str:
        """Which Adam megatron-core picks (it tries TE's, then apex's FusedAdam, then torch's AdamW)."""
        if self.transformer_engine:
            return "TE FusedAdam"
        return "apex FusedAdam" if self.apex else "torch AdamW"


def detect(device: str, enabled: bool = True) -> Kernels:
    """The kernels that can run on ``device`` (``"cuda"`` or ``"cpu"``) here; all off if not ``enabled``."""
    if device != "cuda" or not torch.cuda.is_available():
        return Kernels()
    te, apex = have_transformer_engine(), have_nvidia_apex()
    if not enabled:
        return Kernels(transformer_engine=te, apex=apex)
    compiled = _torch_compile_works()
    return Kernels(
        transformer_engine=te,
        apex=apex,
        masked_softmax=all(_imports(m) for m in _SOFTMAX_EXTENSIONS),
        rope=te,
        bias_activation=compiled,
        bias_dropout=compiled,
        cross_entropy=compiled,
        grad_accumulation=_imports("fused_weight_gradient_mlp_cuda"),
        permute=te and _have_te_permute(),
    )
