"""Autonomy-of-Experts (AoE, arXiv 2501.13074): experts choose tokens by the size of their own gate.

There is no router matrix. Expert i's gate projection is factorised ``Wg_i = Wdown_i [d, r] @ Wup_i [r, D']``.
Every token computes ``x @ Wdown`` for all experts in one GEMM (``[T, d] @ [d, n*r]``); expert i's score
is the L2 norm of its ``r``-slice. Gates follow the reference code (trestad/Autonomy-of-Experts,
``AoE.py``): a softmax over all ``n`` norms, then the top-K, not renormalised (megatron's
``moe_router_pre_softmax=true``, the default for AoE; ``moe.moe_router_pre_softmax=false`` gives a
softmax over the K selected norms instead). megatron's top-k routing runs on the norms, so its
load-balancing and z-losses apply to them. A selected expert continues from the low-rank activation:
``SiLU(low_i @ Wup_i) * (x @ Wp_i) @ Wo_i``, every projection one grouped GEMM over the local experts.

Where the activations live:

* ``AoERouter`` owns all experts' ``Wdown`` (``[n*r, d]``), replicated on every rank like a router weight,
  because every token is scored on the rank that holds it.
* ``AoEExperts`` owns ``Wup``, ``Wp``, ``Wo`` of its local experts (expert-parallel like any expert).
* The cached ``[T, n*r]`` activation is reused when the experts see exactly the router's tokens in
  megatron's expert-major order (EP = 1, TP = 1, no token dropping): the rows are gathered with an index
  computed on the device (no host sync). Otherwise tokens arrive from other ranks without their cache
  and the experts recompute ``x @ Wdown_i`` (2 d r FLOPs per token and selected expert).

What EP costs AoE: ``Wdown`` of all ``n`` experts on every rank (``n d r`` parameters per layer: the
factor ``r / D'`` of the experts' gate parameters, 2/3 at the 3B shapes with the default ``r = d/3``) and
their DP gradient all-reduce; the all-expert scoring GEMM (``2 T n d r`` FLOPs, growing with tokens); and
the recomputation above.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_erc.compat import import_megatron
from moe_erc.config import Config
from moe_erc.model.layers.experts import expert_param_device, grouped_mm

import_megatron()
from megatron.core import parallel_state  # noqa: E402
from megatron.core.dist_checkpointing.mapping import ShardedTensor  # noqa: E402
from megatron.core.transformer.module import MegatronModule  # noqa: E402
from megatron.core.transformer.moe.router import TopKRouter  # noqa: E402

ALIGN = 8  # default widths are multiples of 8: 16-byte rows in bf16/fp16 (32 in fp32), as the grouped GEMM needs


def _aligned_round(x: float) -> int:
    return max(ALIGN, ALIGN * round(x / ALIGN))


def aoe_rank(cfg: Config) -> int:
    """``r``: ``moe.aoe_rank``, or ``d / 3`` rounded to a multiple of 8."""
    return cfg.moe.aoe_rank or min(cfg.model.hidden_size, _aligned_round(cfg.model.hidden_size / 3))


def aoe_width(cfg: Config) -> int:
    """``D'`` so that an AoE expert (``d r + r D' + 2 d D'``) has the parameters of a router row plus a
    SwiGLU expert (``d + 3 d D``) of the router MoE, rounded to a multiple of 8 (unless set)."""
    if cfg.moe.aoe_ffn_hidden_size:
        return cfg.moe.aoe_ffn_hidden_size
    d, r = cfg.model.hidden_size, aoe_rank(cfg)
    D = cfg.moe.moe_ffn_hidden_size or cfg.model.ffn_hidden_size or 4 * d
    return _aligned_round((d + 3 * d * D - d * r) / (r + 2 * d))


class AoERouter(TopKRouter):
    """Scores = norms of each expert's low-rank gate activation; top-K and losses from megatron."""

    rank: int = 1

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        del self.weight  # no router matrix: the experts' down projections replace it
        n, d = self.config.num_moe_experts, self.config.hidden_size
        self.down = torch.nn.Parameter(torch.empty(n * self.rank, d, dtype=self.config.params_dtype))
        if self.config.perform_initialization:
            self.config.init_method(self.down)
        # Replicated on every rank like a router weight; under sequence parallelism each TP rank sees
        # different tokens, so finalize_model_grads must sum its gradient over TP (what this marks).
        setattr(self.down, "sequence_parallel", self.config.sequence_parallel)
        self.cached_low = None
        self.cached_routing_map = None

    def reset_parameters(self):  # the base class initialises a weight this router does not keep
        if hasattr(self, "weight"):
            super().reset_parameters()

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        """``[s, b, d] -> [s, b, n]`` scores ``||x Wdown_i||`` (megatron's routing reads ``[s, b]`` from the
        leading dims, e.g. for the per-sequence aux loss); caches ``x Wdown`` ``[T, n*r]`` for the experts.
        The norm accumulates in fp32 without an fp32 copy of the activations (none is kept for backward)."""
        low = input.reshape(-1, input.shape[-1]) @ self.down.to(input.dtype).t()
        self.cached_low = low
        per_expert = low.view(*input.shape[:-1], self.config.num_moe_experts, self.rank)
        return torch.linalg.vector_norm(per_expert, dim=-1, dtype=torch.float32)

    def forward(self, input: torch.Tensor, padding_mask=None):
        probs, routing_map = super().forward(input, padding_mask=padding_mask)
        self.cached_routing_map = routing_map
        return probs, routing_map


class AoEExperts(MegatronModule):
    """The local experts' ``Wup [r, D']``, ``Wp [D', d]``, ``Wo [d, D']`` (torch Linear layouts, stacked)."""

    rank: int = 1
    width: int = 1
    takes_device_counts = True  # token counts may stay on the device (moe_erc.model.layers.dispatch)

    def __init__(self, num_local_experts: int, config, submodules=None, pg_collection=None, name=None, **_):
        super().__init__(config=config)
        if parallel_state.get_expert_tensor_parallel_world_size() != 1:
            raise ValueError("moe.router=aoe needs parallel.expert_tensor_parallel_size=1")
        self.num_local_experts = num_local_experts
        d, r, w = config.hidden_size, self.rank, self.width
        # Allocated where the RNG tracker's expert-parallel stream draws: on the GPU, the tracker forks
        # the CUDA generator, so weights made on the CPU and moved later would be identical on every EP
        # rank. (On CPU the compat layer points the tracker at the CPU generator.) megatron does the same.
        like = {"dtype": config.params_dtype, "device": expert_param_device()}
        self.up_gate = torch.nn.Parameter(torch.empty(num_local_experts, w, r, **like))
        self.up_proj = torch.nn.Parameter(torch.empty(num_local_experts, w, d, **like))
        self.down_proj = torch.nn.Parameter(torch.empty(num_local_experts, d, w, **like))
        if config.perform_initialization:
            # Per EP rank stream, as megatron does for its experts (different experts on different ranks).
            from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, get_expert_parallel_rng_tracker_name

            with get_cuda_rng_tracker().fork(get_expert_parallel_rng_tracker_name()):
                config.init_method(self.up_gate)
                config.init_method(self.up_proj)
                config.output_layer_init_method(self.down_proj)
        for param in self.parameters():
            param.allreduce = False  # expert parameter: megatron DDP reduces it over expert-DP only
        self._router_ref: tuple = ()

    def attach_router(self, router: AoERouter) -> None:
        self._router_ref = (router,)

    def _low_rank(self, hidden: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """``[T', r]``: ``x Wdown_e`` for every (token, local expert) row of ``hidden``.

        From the router's cache when the experts see exactly the router's tokens in megatron's order
        (expert-major, tokens ascending: EP = 1, TP = 1, dropless top-K); else one grouped GEMM.
        """
        router = self._router_ref[0]
        r, first, m = self.rank, parallel_state.get_expert_model_parallel_rank() * self.num_local_experts, \
            self.num_local_experts
        cache, routing_map = router.cached_low, router.cached_routing_map
        router.cached_low = router.cached_routing_map = None  # read once; do not keep it alive
        reuse = (cache is not None and routing_map is not None
                 and parallel_state.get_expert_model_parallel_world_size() == 1
                 and parallel_state.get_tensor_model_parallel_world_size() == 1
                 and self.config.moe_expert_capacity_factor is None
                 and routing_map.shape[0] * self.config.moe_router_topk == hidden.shape[0])
        if reuse:
            tokens, n = routing_map.shape
            # (expert, token) pairs in megatron's permutation order; a stable sort keeps tokens ascending
            # and the static size T*K avoids the host sync that nonzero() / masked_select() would need.
            order = torch.argsort(routing_map.t().reshape(-1).to(torch.int8), descending=True, stable=True)
            order = order[: hidden.shape[0]]
            experts, rows = order // tokens, order % tokens
            return cache.view(tokens, n, r)[rows, experts]
        down = router.down.view(-1, r, router.down.shape[-1])[first:first + m]  # [m, r, d]
        return grouped_mm(hidden, down.to(hidden.dtype), offsets)

    def forward(self, hidden: torch.Tensor, tokens_per_expert, permuted_probs: torch.Tensor, **_):
        """``[T', d]`` tokens sorted by local expert, ``[m]`` counts, ``[T']`` gates -> (``[T', d]``, None)."""
        counts = torch.as_tensor(tokens_per_expert).to(device=hidden.device, dtype=torch.int32, non_blocking=True)
        offsets = torch.cumsum(counts, 0, dtype=torch.int32)
        hidden = hidden.contiguous()
        low = self._low_rank(hidden, offsets).contiguous()                          # [T', r]
        gate = F.silu(grouped_mm(low, self.up_gate, offsets))                       # [T', D']
        inner = (gate * grouped_mm(hidden, self.up_proj, offsets) * permuted_probs.unsqueeze(-1)).to(hidden.dtype)
        return grouped_mm(inner, self.down_proj, offsets), None                    # [T', d]

    @torch.no_grad()
    def gate_activation_norms(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[N, d] -> [N, m_local]`` norms of each local expert's gate pre-activation ``(x Wdown_e) Wup_e``."""
        router, r = self._router_ref[0], self.rank
        first = parallel_state.get_expert_model_parallel_rank() * self.num_local_experts
        norms = []
        for e in range(self.num_local_experts):
            g = first + e
            low = hidden @ router.down[g * r:(g + 1) * r].float().t()
            norms.append((low @ self.up_gate[e].float().t()).norm(dim=-1))
        return torch.stack(norms, dim=1)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Stacked local experts -> the global ``[n, ...]`` tensors, split over EP, replicated over expert-DP."""
        ep_rank = parallel_state.get_expert_model_parallel_rank()
        ep_size = parallel_state.get_expert_model_parallel_world_size()
        replica = (0, 0, parallel_state.get_expert_data_parallel_rank())
        out = {}
        for name, param in self.named_parameters():
            out[f"{prefix}{name}"] = ShardedTensor.from_rank_offsets(
                f"{prefix}{name}", param, *sharded_offsets, (len(sharded_offsets), ep_rank, ep_size),
                replica_id=replica, prepend_axis_num=len(sharded_offsets))
        return out


def aoe_classes(cfg: Config):
    """(router class, experts class) bound to this config's rank and width."""
    r, width = aoe_rank(cfg), aoe_width(cfg)
    router = type("AoERouter", (AoERouter,), {"rank": r})
    experts = type("AoEExperts", (AoEExperts,), {"rank": r, "width": width})
    return router, experts
