"""Run megatron-core (tested: 0.19.2) on CPU with the gloo backend.

megatron-core is CUDA-first: it asks ``torch.cuda`` for devices, streams, events and RNG states, and
creates a few tensors with ``device="cuda"``. On a machine without CUDA we patch *megatron's* view of
the world, never torch's:

1. **A torch view for named megatron modules** (:data:`MODULES_SEEING_CPU_TORCH`). Each listed module's
   global ``torch`` is replaced by :class:`_TorchOnCpu`, which forwards everything to the real torch
   except ``torch.cuda`` (streams/events are no-ops, ``current_device()`` is the CPU, the RNG calls use
   the CPU generator), tensor factories asked for ``device="cuda"`` (built on the CPU) and
   ``autocast("cuda")``. Other code, torch itself included, is untouched.
2. **Function patches** (:data:`FUNCTION_PATCHES`) where megatron asserts CUDA types or relies on CUDA
   tensors converting themselves.

Every target is looked up strictly: a module or attribute that an upstream release renamed raises
:class:`CompatError` at :func:`apply` (and fails ``tests/test_compat.py``) instead of silently skipping.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import types
from dataclasses import dataclass
from typing import Callable

import torch

TESTED_MEGATRON_CORE = "0.19.2"


class CompatError(RuntimeError):
    """A patch target is missing: megatron-core changed; update moe_erc/compat/cpu.py."""


# --------------------------------------------------------------------------------------------------
# 1. What listed megatron modules see as `torch`


class _NullEvent:
    """Stands in for ``torch.cuda.Event``: CPU work is synchronous, so every wait is already done."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


class _NullStream:
    """Stands in for ``torch.cuda.Stream``: one implicit CPU stream."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event or _NullEvent()

    def synchronize(self):
        pass

    def query(self):
        return True

    def __eq__(self, other):
        return isinstance(other, _NullStream)

    def __hash__(self):
        return 0


_THE_STREAM = _NullStream()


class _CudaOnCpu(types.ModuleType):
    """``torch.cuda`` as the listed megatron modules see it on a CPU machine."""

    Stream = _NullStream
    Event = _NullEvent

    def __init__(self):
        super().__init__("torch.cuda (moe-erc CPU view)")

    def __getattr__(self, name):  # everything not overridden: the real torch.cuda
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device():
        # The default device: the CPU, or "meta" inside `with torch.device("meta")` (moe-erc plan builds
        # 15B models there without allocating them).
        return torch.get_default_device()

    @staticmethod
    def current_stream(device=None):
        return _THE_STREAM

    default_stream = current_stream

    @staticmethod
    def stream(stream):
        return contextlib.nullcontext()

    @staticmethod
    def synchronize(device=None):
        pass

    @staticmethod
    def empty_cache():
        pass

    @staticmethod
    def memory_allocated(device=None):
        return 0

    max_memory_allocated = memory_allocated
    memory_reserved = memory_allocated

    # The RNG tracker keeps named "CUDA" generator states and forks between them (dropout in TP
    # regions, per-rank expert init). On CPU those states live in the CPU default generator.
    @staticmethod
    def get_rng_state(device="cuda"):
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state, device="cuda"):
        torch.set_rng_state(state)

    @staticmethod
    def manual_seed(seed):
        torch.manual_seed(seed)


def _on_cpu(device):
    """A CUDA device -> the default device (the CPU, or "meta" inside a meta-device context)."""
    if isinstance(device, str) and device.startswith("cuda"):
        return torch.get_default_device()
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.get_default_device()
    return device


def _cpu_factory(factory: Callable) -> Callable:
    def build(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _on_cpu(kwargs["device"])
        return factory(*args, **kwargs)

    build.__name__ = factory.__name__
    build.__doc__ = f"{factory.__name__} with device='cuda' mapped to the CPU (moe-erc compat)."
    return build


_FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange", "rand", "randn", "randint",
              "zeros_like", "ones_like", "empty_like", "full_like", "as_tensor")


class _DistributedOnCpu(types.ModuleType):
    """``torch.distributed`` as the listed megatron modules see it. Gloo refuses an all-gather of pieces of
    different sizes ("invalid tensor size") and has no reduce-scatter of a list; megatron uses both for the
    uneven token counts of TP x EP dispatch (NCCL takes them). Uneven pieces are padded to the largest,
    exchanged with the collectives gloo has, and cut back; even ones go to torch unchanged."""

    def __init__(self):
        super().__init__("torch.distributed (moe-erc CPU view)")

    def __getattr__(self, name):
        return getattr(torch.distributed, name)

    @staticmethod
    def all_gather(tensor_list, tensor, group=None, async_op=False):
        if len({tuple(t.shape) for t in tensor_list} | {tuple(tensor.shape)}) == 1:
            return torch.distributed.all_gather(tensor_list, tensor, group=group, async_op=async_op)
        rows = max(t.shape[0] for t in tensor_list)
        padded = tensor.new_zeros((rows, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        gathered = [torch.empty_like(padded) for _ in tensor_list]
        torch.distributed.all_gather(gathered, padded, group=group)
        for out, piece in zip(tensor_list, gathered):
            out.copy_(piece[: out.shape[0]])
        return None

    @staticmethod
    def reduce_scatter(output, input_list, op=torch.distributed.ReduceOp.SUM, group=None, async_op=False):
        rows = max(t.shape[0] for t in input_list)
        stacked = input_list[0].new_zeros((len(input_list), rows, *input_list[0].shape[1:]))
        for i, piece in enumerate(input_list):
            stacked[i, : piece.shape[0]] = piece
        torch.distributed.all_reduce(stacked, op=op, group=group)
        output.copy_(stacked[torch.distributed.get_rank(group)][: output.shape[0]])
        return None


class _TorchOnCpu(types.ModuleType):
    """``torch`` as the listed megatron modules see it: the real one except for the CUDA parts."""

    def __init__(self):
        super().__init__("torch (moe-erc CPU view)")
        self.cuda = _CudaOnCpu()
        self.distributed = _DistributedOnCpu()
        for name in _FACTORIES:
            setattr(self, name, _cpu_factory(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def autocast(device_type, *args, **kwargs):
        return torch.autocast("cpu" if str(device_type).startswith("cuda") else device_type, *args, **kwargs)


TORCH_ON_CPU = _TorchOnCpu()

# module -> why it needs the CPU view of torch (megatron-core 0.19.2 call sites). Only modules whose CUDA
# calls moe-erc's code paths reach are listed (traced over the test suite, a checkpointing run and a PP=2
# run); modules whose CUDA calls sit behind features moe-erc does not use on CPU (distributed optimizer,
# fully-parallel checkpointing, delayed expert wgrad, inference buffers) are left alone.
MODULES_SEEING_CPU_TORCH: dict[str, str] = {
    "megatron.core.utils": "GlobalMemoryBuffer and local multi-tensor l2 norm allocate on "
                           "torch.cuda.current_device() / device='cuda'",
    "megatron.core.tensor_parallel.layers": "weight init and SP all-gather buffers on current_device()",
    "megatron.core.tensor_parallel.mappings": "gather/scatter output buffers on current_device(); uneven "
                                              "all-gather / reduce-scatter pieces (TP x EP dispatch), which gloo "
                                              "refuses",
    "megatron.core.tensor_parallel.random": "RNG tracker seeds and reads CUDA generator states (manual_seed, "
                                            "get_rng_state)",
    "megatron.core.models.common.embeddings.rotary_pos_embedding": "inv_freq moved to current_device()",
    "megatron.core.models.common.embeddings.yarn_rotary_pos_embedding": "MLA's yarn inv_freq on current_device()",
    "megatron.core.transformer.utils": "get_default_causal_mask builds on device='cuda'",
    "megatron.core.transformer.dot_product_attention": "attention-sink logits (softmax_offset) on current_device()",
    "megatron.core.transformer.multi_token_prediction": "MTP loss tracker on current_device()",
    "megatron.core.transformer.moe.router": "expert-bias / token-count buffers on current_device()",
    "megatron.core.transformer.moe.token_dispatcher": "alltoall dispatcher's device-to-host side stream",
    "megatron.core.distributed.param_and_grad_buffer": "param/grad buffers on current_device(), streams",
    "megatron.core.optimizer.optimizer": "found_inf / scale tensors with device='cuda'",
    "megatron.core.optimizer.clip_grads": "grad-norm accumulators with device='cuda'",
    "megatron.core.pipeline_parallel.schedules": "token counter built with device='cuda'",
    "megatron.core.pipeline_parallel.p2p_communication": "receive buffers on current_device()",
    "megatron.core.dist_checkpointing.strategies.filesystem_async": "preload_tensors calls synchronize()",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver": "save verification flags on current_device()",
}


# --------------------------------------------------------------------------------------------------
# 2. Function patches


def _get_rng_state_on_cpu(device="cuda", clone=False, graph_safe=False):
    state = torch.get_rng_state()
    return state.clone() if clone else state


def _set_rng_state_on_cpu(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


def _move_splits_to_host(tensor, as_numpy=False, record_stream=False):
    """megatron's version converts only CUDA tensors, so on CPU the alltoall split sizes stay tensors
    and gloo's ``all_to_all_single`` rejects them: convert CPU tensors too when numpy is asked for."""
    if torch.is_tensor(tensor) and as_numpy:
        return tensor.numpy()
    return tensor


def _clip_grad_by_total_norm_on_cpu(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """megatron's version asserts ``grad.type() == 'torch.cuda.FloatTensor'``; same scaling on CPU."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if isinstance(clip_coeff, torch.Tensor):
        clip_coeff = clip_coeff.clamp_max(1.0)
        torch._foreach_mul_(grads, clip_coeff) if grads else None
    elif clip_coeff < 1.0 and grads:
        torch._foreach_mul_(grads, clip_coeff)


def _torch_norm_with_sequence_parallel(original_new):
    """megatron's torch-norm wrapper asserts ``not sequence_parallel``, yet its MoE layer requires SP
    when TP > 1 (transformer-engine/apex norms handle this on GPU). A torch norm is correct under SP if
    its weight gradients are summed over the TP group, which ``finalize_model_grads`` does for params
    marked ``sequence_parallel``: build the norm without the assert and mark its params."""

    def __new__(cls, config, hidden_size, *args, **kwargs):
        if not config.sequence_parallel:
            return original_new(cls, config, hidden_size, *args, **kwargs)
        config.sequence_parallel = False
        try:
            norm = original_new(cls, config, hidden_size, *args, **kwargs)
        finally:
            config.sequence_parallel = True
        for param in norm.parameters():
            param.sequence_parallel = True
        return norm

    return __new__


def _cuda_type_name(tensor: torch.Tensor) -> str:
    """``torch.BFloat16Tensor`` -> ``torch.cuda.BFloat16Tensor`` (what megatron's type checks expect)."""
    name = torch.Tensor.type(tensor)
    return name if ".cuda." in name else name.replace("torch.", "torch.cuda.", 1)


def _float16_optimizer_init_on_cpu(original_init):
    """megatron's mixed-precision optimizer sorts parameters into fp16/bf16 and fp32 groups by
    ``param.type()`` and accepts only ``torch.cuda.*`` names, so bf16 training cannot start on CPU. For the
    duration of its constructor each parameter answers ``type()`` with the CUDA name of its dtype (an
    instance attribute shadowing the method; removed afterwards); megatron's own code does the sorting."""

    def __init__(self, optimizer, *args, **kwargs):
        params = [p for group in optimizer.param_groups for p in group["params"]] if optimizer else []
        for param in params:
            param.type = functools.partial(_cuda_type_name, param)
        try:
            original_init(self, optimizer, *args, **kwargs)
        finally:
            for param in params:
                param.__dict__.pop("type", None)

    return __init__


@dataclass(frozen=True)
class FunctionPatch:
    module: str
    attribute: str  # "name" or "Class.name"
    make_replacement: Callable[[Callable], Callable]  # original -> replacement
    reason: str


FUNCTION_PATCHES: list[FunctionPatch] = [
    FunctionPatch("megatron.core.tensor_parallel.random", "_get_cuda_rng_state",
                  lambda original: _get_rng_state_on_cpu,
                  "reads torch.cuda.default_generators; use the CPU generator"),
    FunctionPatch("megatron.core.tensor_parallel.random", "_set_cuda_rng_state",
                  lambda original: _set_rng_state_on_cpu,
                  "writes CUDA generator state via _lazy_call; use the CPU generator"),
    FunctionPatch("megatron.core.transformer.moe.token_dispatcher", "maybe_move_tensor_to_cpu",
                  lambda original: _move_splits_to_host,
                  "alltoall split sizes must be host numpy arrays for gloo all_to_all_single at EP>1"),
    FunctionPatch("megatron.core.optimizer.optimizer", "clip_grad_by_total_norm_fp32",
                  lambda original: _clip_grad_by_total_norm_on_cpu,
                  "asserts grads are torch.cuda.FloatTensor"),
    FunctionPatch("megatron.core.optimizer.clip_grads", "clip_grad_by_total_norm_fp32",
                  lambda original: _clip_grad_by_total_norm_on_cpu,
                  "same function, for callers that import it from clip_grads"),
    FunctionPatch("megatron.core.optimizer.optimizer", "Float16OptimizerWithFloat16Params.__init__",
                  _float16_optimizer_init_on_cpu,
                  "sorts bf16/fp32 parameters by param.type() and accepts only torch.cuda.* types (bf16 on CPU)"),
    FunctionPatch("megatron.core.transformer.torch_norm", "WrappedTorchNorm.__new__",
                  _torch_norm_with_sequence_parallel,
                  "asserts no sequence parallelism, which MoE with TP>1 requires"),
]



class _DropCpuRngWarning(logging.Filter):
    """The RNG tracker warns when the CPU generator moves inside a fork of the "CUDA" generator. On CPU
    the two are the same generator, so the warning fires on every dropout/init and means nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


# --------------------------------------------------------------------------------------------------

_APPLIED = False


def _import(module_name: str):
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        raise CompatError(f"{module_name} is gone in this megatron-core ({exc}); "
                          f"moe_erc/compat/cpu.py was written for {TESTED_MEGATRON_CORE}") from exc


def _resolve(module, dotted: str):
    owner = module
    *path, name = dotted.split(".")
    for part in path:
        owner = getattr(owner, part)
    return owner, name


def apply() -> None:
    """Apply every patch once. Raises :class:`CompatError` if a target is missing."""
    global _APPLIED
    if _APPLIED:
        return
    from moe_erc.compat import ensure_importable

    ensure_importable()
    for module_name in MODULES_SEEING_CPU_TORCH:
        module = _import(module_name)
        if getattr(module, "torch", None) not in (torch, TORCH_ON_CPU):
            raise CompatError(f"{module_name} no longer has a global 'torch'; update moe_erc/compat/cpu.py")
        module.torch = TORCH_ON_CPU
    for patch in FUNCTION_PATCHES:
        module = _import(patch.module)
        try:
            owner, name = _resolve(module, patch.attribute)
            original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
        except (AttributeError, KeyError) as exc:
            raise CompatError(f"{patch.module}.{patch.attribute} is gone ({exc}); "
                              f"moe_erc/compat/cpu.py was written for megatron-core {TESTED_MEGATRON_CORE}")
        if isinstance(original, staticmethod):
            original = original.__func__
        replacement = patch.make_replacement(original)
        replacement._moe_erc_patch = True
        setattr(owner, name, staticmethod(replacement) if name == "__new__" else replacement)
    logging.getLogger("megatron.core.tensor_parallel.random").addFilter(_DropCpuRngWarning())
    _APPLIED = True


def patches_applied() -> list[str]:
    """One line per patch, for logs and the closing note."""
    lines = [f"{m}: torch.cuda -> CPU ({why})" for m, why in MODULES_SEEING_CPU_TORCH.items()]
    lines += [f"{p.module}.{p.attribute}: {p.reason}" for p in FUNCTION_PATCHES]
    return lines

