"""Grouped-GEMM experts on PyTorch's ``torch._grouped_mm`` (no transformer-engine needed).

megatron-core's only expert module without transformer-engine, ``SequentialMLP``, runs the local experts
one by one: two small GEMMs per expert and a host sync for the split sizes. :class:`GroupedExperts`
keeps the local experts' weights stacked and runs each projection as one grouped GEMM over the
expert-sorted tokens (CUTLASS kernels for bf16 on Hopper; a loop fallback elsewhere, CPU included):

    weight1  [m, 2*D, d]   per expert [gate; up] (SwiGLU; [m, D, d] without GLU), torch Linear layout
    weight2  [m, d, D]
    bias1    [m, 2*D], bias2 [m, d]   with ``model.add_bias_linear`` only (gpt-oss)
    out_t = prob_t * (act(x_t Wg_e^T + bg_e) * (x_t Wu_e^T + bu_e)) Wo_e^T + prob_t * bo_e
                                                                   for token t routed to local expert e

It is a drop-in for ``SequentialMLP`` (chosen by ``moe.moe_grouped_gemm=true`` when transformer-engine is
absent, through the layer spec):

* the same seed gives the same weights: expert by expert, fc1 then fc2, drawn from the RNG tracker's
  expert-parallel stream, on the device that stream lives on;
* the same checkpoint keys, shapes and shard offsets (``experts.experts.linear_fc{1,2}.weight`` with an
  expert axis, gate/up halves sharded separately), so checkpoints load into either module and reshard;
* expert tensor parallelism shards ``D`` like megatron's column/row-parallel expert linears (the token
  dispatcher does the communication).
"""

from __future__ import annotations

import warnings

import torch

from moe_erc.compat import import_megatron, runtime_device

import_megatron()
from megatron.core import parallel_state  # noqa: E402
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory  # noqa: E402
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes  # noqa: E402
from megatron.core.tensor_parallel.random import (  # noqa: E402
    get_cuda_rng_tracker,
    get_expert_parallel_rng_tracker_name,
)
from megatron.core.transformer.module import MegatronModule  # noqa: E402


def expert_param_device() -> torch.device:
    """Where expert weights are allocated: the current GPU when running on CUDA (the RNG tracker forks the
    CUDA generator there), else the default device (the CPU, or meta inside ``moe-erc plan``)."""
    if runtime_device() == "cuda" and torch.get_default_device().type != "meta":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.get_default_device()


def _aligned(t: torch.Tensor) -> bool:
    """The grouped GEMM kernels need 16-byte-aligned strides (all but the unit one) and base address."""
    size = t.element_size()
    return t.data_ptr() % 16 == 0 and all((st * size) % 16 == 0 for st in t.stride() if st != 1)


_WARNED: set = set()


def grouped_mm_fast_path(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` runs its one CUTLASS kernel here: CUDA, bf16 (inputs and output), compute
    capability 9.x or 10.x (H100/H200/GH200, B200/GB200). Elsewhere (fp32/fp16, A100, L40S, ...) the op loops
    over the experts after copying the offsets to the host: a GPU stall per call (PyTorch's
    ``_grouped_mm_cuda``, aten/src/ATen/native/cuda/GroupedBlas.cpp). CPU: a loop, without a stall."""
    if device.type != "cuda":
        return True  # CPU (or meta): nothing to stall
    return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device)[0] in (9, 10)


def _warn_unaligned(tokens: torch.Tensor, weights: torch.Tensor) -> None:
    """Once per shape: the per-expert loop reads the offsets on the host (a GPU stall per call) and launches
    two GEMMs per expert."""
    key = (tuple(weights.shape), tokens.dtype)
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(f"grouped GEMM: expert weights {tuple(weights.shape)} in {tokens.dtype} are not 16-byte "
                      f"aligned (make every width a multiple of 8), so each expert runs its own GEMM and the "
                      f"token offsets are read on the host", stacklevel=3)


def grouped_mm(tokens: torch.Tensor, weights: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``[T, k]`` expert-sorted tokens, ``[m, n, k]`` weights (Linear layout), ``[m]`` int32 cumulative token
    counts -> ``[T, n]``: rows of expert e times ``weights[e]^T``. One kernel, no host sync on the bf16 path.

    Shapes whose rows are not 16-byte aligned (e.g. an odd width in a test model) take a per-expert loop,
    which reads the offsets on the host.
    """
    mat_b = weights.transpose(-2, -1)
    out_row_bytes = weights.shape[1] * tokens.element_size()  # backward multiplies [T, n] gradients too
    if _aligned(tokens) and _aligned(mat_b) and out_row_bytes % 16 == 0:
        return torch._grouped_mm(tokens, mat_b, offs=offsets)
    _warn_unaligned(tokens, weights)
    bounds = [0, *offsets.tolist()]
    out = tokens.new_empty(tokens.shape[0], weights.shape[1])
    for e in range(weights.shape[0]):
        out[bounds[e]:bounds[e + 1]] = tokens[bounds[e]:bounds[e + 1]] @ mat_b[e]
    return out


class GroupedExperts(MegatronModule):
    """The local experts of one MoE layer as two stacked weights; see the module docstring."""

    takes_device_counts = True  # token counts may stay on the device (moe_erc.model.layers.dispatch)

    def __init__(self, num_local_experts: int, config, submodules=None, pg_collection=None, name=None, **_):
        super().__init__(config=config)
        self.num_local_experts = m = num_local_experts
        self.etp_size = parallel_state.get_expert_tensor_parallel_world_size()
        self.etp_rank = parallel_state.get_expert_tensor_parallel_rank()
        if config.add_bias_linear and self.etp_size > 1:  # config.py refuses this first, in one line
            raise ValueError("GroupedExperts' expert biases need expert_tensor_parallel_size=1")
        self._fast_path = None  # torch._grouped_mm's single-kernel path on this device/dtype (first forward)
        self.ffn_local = config.moe_ffn_hidden_size // self.etp_size
        self.gated = config.gated_linear_unit
        d, width = config.hidden_size, self.ffn_local
        like = {"dtype": config.params_dtype, "device": expert_param_device()}
        self.weight1 = torch.nn.Parameter(torch.empty(m, (2 if self.gated else 1) * width, d, **like))
        self.weight2 = torch.nn.Parameter(torch.empty(m, d, width, **like))
        self.bias1 = self.bias2 = None
        if config.add_bias_linear:  # zeros, as megatron initialises linear biases (no RNG draw: same weights)
            self.bias1 = torch.nn.Parameter(torch.zeros(m, self.weight1.shape[1], **like))
            self.bias2 = torch.nn.Parameter(torch.zeros(m, d, **like))
        if config.perform_initialization:
            # SequentialMLP's order: expert 0 fc1, expert 0 fc2, expert 1 fc1, ... from the expert stream.
            with get_cuda_rng_tracker().fork(get_expert_parallel_rng_tracker_name()):
                for e in range(m):
                    config.init_method(self.weight1.data[e])
                    config.output_layer_init_method(self.weight2.data[e])
        # As megatron marks its expert linears: D split over expert-TP (dim 1 of fc1, dim 2 of fc2).
        set_tensor_model_parallel_attributes(self.weight1, is_parallel=True, dim=1, stride=1)
        set_tensor_model_parallel_attributes(self.weight2, is_parallel=True, dim=2, stride=1)
        if self.bias1 is not None:
            set_tensor_model_parallel_attributes(self.bias1, is_parallel=True, dim=1, stride=1)
        for param in self.parameters():
            param.allreduce = False  # expert parameter: megatron DDP reduces it over expert-DP only

    def gate_weight(self) -> torch.Tensor:
        """``[m, D_local, d]`` view of the gate projections (what the ERC loss reads; no copy)."""
        return self.weight1[:, : self.ffn_local] if self.gated else self.weight1

    def forward(self, hidden: torch.Tensor, tokens_per_expert, permuted_probs: torch.Tensor, **_):
        """``[T, d]`` tokens sorted by local expert, ``[m]`` counts, ``[T]`` gate probabilities -> (``[T, d]``, None)."""
        counts = torch.as_tensor(tokens_per_expert).to(device=hidden.device, dtype=torch.int32, non_blocking=True)
        offsets = torch.cumsum(counts, 0, dtype=torch.int32)
        if self._fast_path is None:
            self._fast_path = grouped_mm_fast_path(hidden.device, hidden.dtype)
            if not self._fast_path:
                warnings.warn(f"GroupedExperts: torch._grouped_mm has no single-kernel path for {hidden.dtype} on "
                              f"{torch.cuda.get_device_name(hidden.device)}; it loops over experts with a host "
                              f"sync per call (bf16 on compute capability 9.x/10.x is the fast path)")
        hidden = hidden.contiguous()  # the CUDA kernel needs 16-byte-aligned row-major tokens (no-op if so)
        h = grouped_mm(hidden, self.weight1, offsets)                    # [T, 2D] or [T, D]
        expert = None
        if self.bias1 is not None:  # each token's local expert; output_size keeps it free of a host sync
            expert = torch.repeat_interleave(torch.arange(self.num_local_experts, device=hidden.device), counts,
                                             output_size=hidden.shape[0])
            h = h + self.bias1[expert]
        if self.gated:  # as megatron's MLP: gate clamped above, linear part to +-clamp, then act(gate) * (up + offset)
            gate, up = torch.chunk(h, 2, dim=-1)
            clamp = self.config.activation_func_clamp_value
            if clamp is not None:
                gate, up = gate.clamp(max=clamp), up.clamp(min=-clamp, max=clamp)
            offset = self.config.glu_linear_offset
            inner = self.config.activation_func(gate) * (up + offset if offset else up)
        else:
            inner = self.config.activation_func(h)
        inner = (inner * permuted_probs.unsqueeze(-1)).to(hidden.dtype)  # as megatron's MLP: probs in fp32
        out = grouped_mm(inner, self.weight2, offsets)
        if expert is not None:  # the output bias weighted by the gate, as the rest of the expert's output
            out = out + (permuted_probs.unsqueeze(-1) * self.bias2[expert]).to(out.dtype)
        return out, None

    # ---------------------------------------------------------------- checkpoints (SequentialMLP layout)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """The keys, shapes and offsets ``SequentialMLP`` writes, so checkpoints move between the two."""
        ep_rank = parallel_state.get_expert_model_parallel_rank()
        n_global = parallel_state.get_expert_model_parallel_world_size() * self.num_local_experts
        first = ep_rank * self.num_local_experts
        replica = (0, 0, parallel_state.get_expert_data_parallel_rank())
        axis = len(sharded_offsets)  # the expert axis; the weight's own dims follow it
        ckpt = f"{prefix}experts."
        tp, tp_rank = self.etp_size, self.etp_rank

        def per_expert(e: int):
            return (*sharded_offsets, (axis, first + e, n_global))

        def fc1_build(key, data, replica_id, flattened_range):
            pieces = []
            for e in range(self.num_local_experts):
                if self.gated:  # gate and up halves are separate shards along D (they reshard over TP)
                    gate, up = torch.chunk(data[e], 2, dim=0)
                    pieces.append([
                        ShardedTensor.from_rank_offsets(key, gate, *per_expert(e), (axis + 1, tp_rank, 2 * tp),
                                                        replica_id=replica_id, prepend_axis_num=axis + 1),
                        ShardedTensor.from_rank_offsets(key, up, *per_expert(e), (axis + 1, tp_rank + tp, 2 * tp),
                                                        replica_id=replica_id, prepend_axis_num=axis + 1)])
                else:
                    pieces.append([ShardedTensor.from_rank_offsets(
                        key, data[e], *per_expert(e), (axis + 1, tp_rank, tp),
                        replica_id=replica_id, prepend_axis_num=axis + 1)])
            return pieces

        def fc1_merge(pieces):
            return torch.stack([torch.cat(halves, dim=0) for halves in pieces])

        out = {
            f"{prefix}weight1": ShardedTensorFactory(f"{ckpt}linear_fc1.weight", self.weight1, fc1_build,
                                                     fc1_merge, replica),
            f"{prefix}weight2": ShardedTensorFactory(
                f"{ckpt}linear_fc2.weight", self.weight2,
                lambda key, data, replica_id, _: [ShardedTensor.from_rank_offsets(
                    key, data[e], *per_expert(e), (axis + 2, tp_rank, tp), replica_id=replica_id,
                    prepend_axis_num=axis + 1) for e in range(self.num_local_experts)],
                torch.stack, replica),
        }
        if self.bias1 is not None:  # SequentialMLP's linear_fc{1,2}.bias, with the expert axis
            out[f"{prefix}bias1"] = ShardedTensorFactory(f"{ckpt}linear_fc1.bias", self.bias1, fc1_build, fc1_merge,
                                                         replica)
            out[f"{prefix}bias2"] = ShardedTensorFactory(
                f"{ckpt}linear_fc2.bias", self.bias2,
                lambda key, data, replica_id, _: [ShardedTensor.from_rank_offsets(
                    key, data[e], *per_expert(e), replica_id=replica_id, prepend_axis_num=axis + 1)
                    for e in range(self.num_local_experts)],
                torch.stack, (0, tp_rank, replica[2]))
        # SequentialMLP's linears also write an (empty) extra state per expert; write the same entries so a
        # SequentialMLP model finds them in our checkpoints. They are dropped again on load.
        outer = tuple(size for _, _, size in sharded_offsets)
        outer_offset = tuple(offset for _, offset, _ in sharded_offsets)
        extra_replica = (0, tp_rank, replica[2])  # one writer per expert: expert-TP rank 0 of expert-DP rank 0
        for e in range(self.num_local_experts):
            for fc in ("linear_fc1", "linear_fc2"):
                out[f"{prefix}{_EXTRA}{fc}.{e}"] = ShardedObject(
                    f"{ckpt}{fc}._extra_state", None, (*outer, n_global), (*outer_offset, first + e),
                    replica_id=extra_replica)
        return out

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for key in [k for k in state_dict if k.startswith(f"{prefix}{_EXTRA}")]:
            del state_dict[key]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


_EXTRA = "sequential_mlp_extra_state."
