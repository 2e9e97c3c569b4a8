"""Online K-Means router (``moe.router: kmeans``; arXiv 2605.12476): parameter-free centroid routing.

Each expert ``i`` keeps a unit centroid ``c_i`` (buffer ``centroids`` ``[n, d]`` fp32). A token ``x`` is
compared with every centroid by cosine similarity ``s_i = <x/|x|, c_i>`` and goes to the top-K experts.

* **Selection**: top-K of ``s`` (``s + expert_bias`` with ``moe.moe_router_enable_expert_bias``).
* **Gates**: megatron's score function on ``logits = s / temperature`` at the selected experts
  (``topk_routing_with_score_function`` with precomputed indices): with ``softmax`` (default) the gates are
  ``softmax`` over the K selected ``s_i / temperature``; with ``sigmoid`` they are ``sigmoid(s_i / T)``
  normalised over the K selected. The bias never enters the gates. Gates are differentiable with respect
  to the hidden states (through the normalised ``x``); there is nothing to train in the router.
* **Centroid update** (no gradient, once per optimizer step): training forwards accumulate, per expert,
  the sum of the normalised hidden states routed to it and their count (over all micro-batches; eval and
  no-grad forwards do not count). :meth:`KMeansRouter.update_after_step`, which the trainer calls on every
  rank after ``optimizer.step()``, sums them over the ranks that hold different tokens of this layer
  (TP x DP x CP: sequence parallelism splits tokens over TP), then for every expert that received tokens
  ``c_i <- normalize(m c_i + (1 - m) mean_i)`` with ``m = moe.kmeans_momentum``. All ranks apply the
  same update to the same centroids, so the centroids stay identical everywhere.
* **Running mean** (``moe.kmeans_update: running_mean``): instead of the EMA, each centroid is the direction
  of the running average of every (normalised) token routed to it since it was seeded. The router keeps the
  length ``L_i`` of that running sum (buffer ``running_sum_norm``, fp64), so ``L_i c_i`` is the sum itself:
  ``v = L_i c_i + sums_i``, ``c_i <- v / |v|``, ``L_i <- |v|``. An expert that gets one token moves about
  1/(N+1) of the way after N tokens, where the EMA moves every expert ``1 - m`` of the way.
* **Centring** (``moe.kmeans_center``): tokens are compared as ``normalize(h - mu)``, ``mu`` (buffer
  ``hidden_mean`` ``[d]``) an EMA (momentum ``m``) of the mean raw hidden state of the step's training
  tokens, from the same collective; the first update sets it to the step's mean.
* **Gates without gradient** (``moe.kmeans_gate_grad: false``): the gates are computed from detached
  similarities, so the LM loss does not pull hidden states towards centroids through them.
* **Initialisation**: random unit vectors from a generator seeded by (``training.seed``, global layer
  number): identical on every rank and independent of the parallel layout.
* **Balancing**: subclassing megatron's ``TopKRouter`` brings its ``expert_bias`` /
  ``local_tokens_per_expert`` buffers; ``finalize_model_grads`` updates the bias from the token counts
  (aux-loss-free balancing, arXiv 2408.15664), which are taken, like the centroid statistics, in training
  forwards only and without padding tokens (``padding_mask`` as in megatron's router: True = padding).
  megatron's ``TransformerConfig`` only accepts the expert bias with ``moe_router_score_function:
  sigmoid``. Auxiliary losses are rejected by the config (there is no parameter they could train); a
  z-loss (``moe_z_loss_coeff``) acts on ``s / temperature`` and so only on the hidden states.
* **Temperature** ``T`` = ``moe.kmeans_temperature`` (1.0: softmax over cosines, gates between about 0.12
  and 0.88 for K=2; 0.1 was no better on the tiny model).
* **Seeding from data**: random unit vectors have cosine ~1/sqrt(d) with every token, so the first update
  replaces every centroid by a sampled token, and a centroid that has received no token for
  ``moe.kmeans_reseed_steps`` updates is replaced by a sampled token too. The sample is the same on every
  rank and in every layout: ``n`` tokens (seeded by seed, layer and step) of the first
  ``moe.kmeans_seed_sequences`` sequences of the step's first micro-batch, which the rank holding each
  contributes to an all-reduce over the token-holding ranks.
* **Non-finite steps**: a step the trainer skips (``nan_policy=skip``) discards the statistics it gathered
  (:func:`moe_erc.model.layers.routers.end_of_step`), and an expert whose mean is not finite keeps its centroid.
* **Checkpoints**: ``centroids`` (and ``expert_bias``) are persistent buffers; megatron's default
  ``sharded_state_dict`` saves them as replicated tensors and loading restores them in any layout.

The router has no parameters: ``TopKRouter``'s ``weight`` is created (so the random stream, and with it
every other initial weight, is the one a ``topk`` model with the same seed gets) and then deleted.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from moe_erc.compat import import_megatron

import_megatron()
from megatron.core import parallel_state  # noqa: E402
from megatron.core.transformer.moe.moe_utils import (  # noqa: E402
    apply_router_token_dropping,
    topk_routing_with_score_function,
)
from megatron.core.transformer.moe.router import TopKRouter  # noqa: E402


def centroid_seed(base_seed: int, layer_number: int) -> int:
    """Seed of layer ``layer_number``'s initial centroids: the same on every rank and in every layout."""
    return (base_seed * 1_000_003 + layer_number * 7_919 + 17) % (2**63 - 1)


def initial_centroids(num_experts: int, hidden_size: int, base_seed: int, layer_number: int) -> torch.Tensor:
    """``[n, d]`` fp32 random unit vectors (CPU)."""
    generator = torch.Generator().manual_seed(centroid_seed(base_seed, layer_number))
    c = torch.randn(num_experts, hidden_size, generator=generator, dtype=torch.float64, device="cpu")
    return F.normalize(c, dim=-1).float()


def ema_update(centroids: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor, momentum: float) -> torch.Tensor:
    """New centroids: ``normalize(m c_i + (1 - m) sums_i / counts_i)`` where ``counts_i > 0`` and the mean is
    finite, else ``c_i`` (a non-finite mean is never folded in)."""
    mean = sums / counts.clamp_min(1).unsqueeze(-1)
    usable = ((counts > 0) & torch.isfinite(mean).all(dim=-1)).unsqueeze(-1)
    moved = F.normalize(momentum * centroids + (1.0 - momentum) * mean, dim=-1)
    return torch.where(usable, moved, centroids)  # no boolean indexing: no host sync


def running_mean_update(centroids: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor,
                        lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(new centroids, new lengths): ``v = L_i c_i + sums_i`` (the running sum of every token routed to expert
    ``i``), ``c_i = v / |v|``, ``L_i = |v|``, where ``counts_i > 0`` and the sums are finite; else unchanged."""
    total = lengths.unsqueeze(-1) * centroids.double() + sums.double()
    norm = total.norm(dim=-1)
    usable = (counts > 0) & torch.isfinite(sums).all(dim=-1) & (norm > 0)
    moved = (total / norm.clamp_min(1e-30).unsqueeze(-1)).to(centroids.dtype)
    return torch.where(usable.unsqueeze(-1), moved, centroids), torch.where(usable, norm, lengths)


class KMeansRouter(TopKRouter):
    """Top-K by cosine similarity to per-expert EMA centroids of the routed (normalised) hidden states.

    Built by megatron's ``MoELayer`` from the spec. Run settings are class attributes; use
    :func:`kmeans_router_class` to bind them to a config.
    """

    momentum: float = 0.99  # moe.kmeans_momentum
    temperature: float = 1.0  # gates: score function of cos / temperature
    base_seed: int = 1234  # training.seed
    reseed_steps: int = 100  # moe.kmeans_reseed_steps: re-seed a centroid idle for this many updates (0: never)
    update: str = "ema"  # moe.kmeans_update: "ema" | "running_mean"
    seed_sequences: int = 1  # moe.kmeans_seed_sequences: sequences the seed sample is drawn from
    center: bool = False  # moe.kmeans_center: cosine of h - mean(h)
    gate_grad: bool = True  # moe.kmeans_gate_grad: gates carry gradient into the hidden states

    def __init__(self, config, pg_collection=None, is_mtp_layer: bool = False):
        if pg_collection is None:
            from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

            pg_collection = get_default_pg_collection()
        super().__init__(config=config, pg_collection=pg_collection, is_mtp_layer=is_mtp_layer)
        del self.weight  # parameter-free
        if isinstance(getattr(self, "bias", None), torch.nn.Parameter):
            del self.bias
        self.bias = None
        n, d = self.config.num_moe_experts, self.config.hidden_size
        self.register_buffer("centroids", initial_centroids(n, d, self.base_seed, 0))
        # Global tokens per expert of the last step (for logging; not saved).
        self.register_buffer("tokens_per_expert", torch.zeros(n, dtype=torch.float32), persistent=False)
        # Updates since each expert last received a token, and whether centroids were seeded from data.
        self.register_buffer("idle_updates", torch.zeros(n, dtype=torch.float32))
        self.register_buffer("seeded_from_data", torch.zeros(1, dtype=torch.float32))
        # Length of each expert's running token sum since it was seeded (running_mean); hidden-state mean (center).
        # Saved only when their option is on, so default checkpoints keep their keys.
        self.register_buffer("running_sum_norm", torch.zeros(n, dtype=torch.float64),
                             persistent=self.update == "running_mean")
        self.register_buffer("hidden_mean", torch.zeros(d, dtype=torch.float32), persistent=self.center)
        self._stats: Optional[torch.Tensor] = None  # [n + 1, d + 1] fp32: sums | counts per expert; raw h row
        self._sample: Optional[torch.Tensor] = None  # [n, d]: this rank's part of the step's token sample
        self._centroids_final = False  # True once trained or loaded: set_layer_number must not re-seed
        if self.tp_dp_cp_group is None:
            self.tp_dp_cp_group = parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True)

    # ------------------------------------------------------------------ megatron hooks

    def reset_parameters(self):  # Router.__init__ initialises the weight before this class deletes it
        if "weight" in self._parameters:
            super().reset_parameters()

    def set_layer_number(self, layer_number: int):
        from moe_erc.model.layers.erc_layer import layer_slot  # an MTP layer seeds apart from decoder layer 1

        super().set_layer_number(layer_number)
        if not self._centroids_final:
            n, d = self.centroids.shape
            self.centroids.copy_(initial_centroids(n, d, self.base_seed, layer_slot(self)))

    def _keep_fp32(self):
        """Float16Module casts buffers to bf16/fp16; centroids and their update stay fp32."""
        if self.centroids.dtype != torch.float32:
            self.centroids.data = self.centroids.data.float()
        for name in ("tokens_per_expert", "idle_updates", "seeded_from_data", "hidden_mean"):
            buffer = getattr(self, name)
            if buffer.dtype != torch.float32:
                buffer.data = buffer.data.float()
        if self.running_sum_norm.dtype != torch.float64:
            self.running_sum_norm.data = self.running_sum_norm.data.double()
        self._maintain_float32_expert_bias()

    def _load_from_state_dict(self, *args, **kwargs):
        self._keep_fp32()
        self._centroids_final = True
        return super()._load_from_state_dict(*args, **kwargs)

    def _save_to_state_dict(self, *args, **kwargs):
        self._keep_fp32()
        return super()._save_to_state_dict(*args, **kwargs)

    # ------------------------------------------------------------------ routing

    def similarities(self, input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised tokens ``[T, d]``, cosine similarities ``[T, n]``) in the router dtype."""
        dtype = torch.float64 if self.config.moe_router_dtype == "fp64" else torch.float32
        h = input.reshape(-1, input.shape[-1]).to(dtype)
        if self.center:
            h = h - self.hidden_mean.to(device=h.device, dtype=dtype)
        x = F.normalize(h, dim=-1)
        return x, x @ self.centroids.to(device=x.device, dtype=dtype).t()

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        """The router's logits ``[T, n]``: cosine similarities / temperature (what the gates are made of)."""
        return self.similarities(input)[1] / self.temperature

    def forward(self, input: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        """``input`` ``[S, B, d]`` (or ``[T, d]``) -> (probs ``[T, n]``, routing_map ``[T, n]`` bool)."""
        self._keep_fp32()
        input = self.apply_input_jitter(input)
        x, sims = self.similarities(input)
        if padding_mask is not None:
            padding_mask = padding_mask.reshape(-1)  # megatron's router convention: True = padding
        logits = self.apply_z_loss((sims if self.gate_grad else sims.detach()) / self.temperature,
                                   padding_mask=padding_mask)
        with torch.no_grad():
            scores = sims.detach()
            if self.expert_bias is not None:
                scores = scores + self.expert_bias.to(scores.dtype)
            top = torch.topk(scores, k=self.topk, dim=1).indices
        probs, routing_map = topk_routing_with_score_function(
            logits, self.topk, use_pre_softmax=self.config.moe_router_pre_softmax,
            scaling_factor=self.config.moe_router_topk_scaling_factor, score_function=self.score_function,
            precomputed_indices=top)
        if self.config.moe_expert_capacity_factor is not None:
            probs, routing_map = apply_router_token_dropping(
                probs, routing_map, router_topk=self.topk, capacity_factor=self.config.moe_expert_capacity_factor,
                drop_policy=self.config.moe_token_drop_policy,
                pad_to_capacity=self.config.moe_pad_expert_input_to_capacity)
        valid = None if padding_mask is None else ~padding_mask.unsqueeze(-1)  # [T, 1]
        if self.training and torch.is_grad_enabled():  # once per training forward (recomputation: the grad pass)
            self._accumulate(x.detach(), routing_map if valid is None else routing_map & valid, input, valid)
            if self._sample is None:  # the step's first micro-batch on this rank
                self._sample = self._token_sample(x.detach(), input.shape)
            # megatron's load counter for the expert bias (masks with `routing_map & ~mask`: give it [T, 1])
            self._apply_expert_bias(routing_map, padding_mask=None if valid is None else ~valid)
        return probs, routing_map

    @torch.no_grad()
    def _accumulate(self, x: torch.Tensor, routing_map: torch.Tensor, hidden: torch.Tensor,
                    valid: Optional[torch.Tensor]):
        """Add this micro-batch's per-expert sums/counts of ``x`` (rows 0..n-1) and the raw hidden states'
        sum/count (row n, with centring) to the step's statistics ``[n (+ 1), d + 1]``."""
        routed = routing_map.to(torch.float32)
        experts = torch.cat([routed.t() @ x.float(), routed.sum(dim=0).unsqueeze(-1)], dim=1)  # [n, d + 1]
        step = experts
        if self.center:  # row n: raw hidden states (only centring uses them; else added once per step)
            h = hidden.reshape(-1, hidden.shape[-1]).float()
            keep = torch.ones(h.shape[0], 1, device=h.device) if valid is None else valid.to(torch.float32)
            step = torch.cat([experts, torch.cat([keep.t() @ h, keep.sum().view(1, 1)], dim=1)], dim=0)
        self._stats = step if self._stats is None else self._stats.add_(step)

    @torch.no_grad()
    def _token_sample(self, x: torch.Tensor, shape) -> torch.Tensor:
        """``[n, d]``: this rank's part of the step's token sample (zeros where another rank holds it).

        The sample is ``n`` tokens of the step's first ``seed_sequences`` sequences (data-parallel rank 0's
        first micro-batch, rows 0..R-1: the same global rows in every layout, as the micro-batch size is),
        chosen by a generator seeded from (seed, layer, step); under sequence parallelism each TP rank holds a
        slice of the positions. Summed over the token-holding ranks, every rank gets the same sample in every
        layout.
        """
        n, d = self.centroids.shape
        sample = torch.zeros(n, d, dtype=torch.float32, device=x.device)
        if len(shape) != 3 or parallel_state.get_data_parallel_rank() != 0:
            return sample
        s_local, batch = shape[0], shape[1]
        tp = parallel_state.get_tensor_model_parallel_world_size() if self.config.sequence_parallel else 1
        tp_rank = parallel_state.get_tensor_model_parallel_rank() if tp > 1 else 0
        from moe_erc.model.layers.erc_layer import current_training_step, layer_slot

        # Drawn on the device (a generator there, seeded alike on every rank): no host tensor to copy over.
        generator = torch.Generator(device=x.device).manual_seed(
            centroid_seed(self.base_seed, layer_slot(self)) + 104_729 * current_training_step())
        sequences = min(self.seed_sequences, batch)
        flat = torch.randint(0, s_local * tp * sequences, (n,), generator=generator, device=x.device)
        positions, sequence = (flat, 0) if sequences == 1 else (flat // sequences, flat % sequences)
        local = positions - tp_rank * s_local
        mine = (local >= 0) & (local < s_local)
        rows = local.clamp(0, s_local - 1) * batch + sequence  # token (pos, batch row) in [S*B, d]
        sample.copy_(torch.where(mine.unsqueeze(-1), x[rows].float(), sample))
        return sample

    def discard_step(self) -> None:
        """Forget what this step's forwards gathered (the trainer skipped the step: non-finite values)."""
        self._stats = None
        self._sample = None

    # ------------------------------------------------------------------ the per-step update

    @torch.no_grad()
    def update_after_step(self) -> None:
        """Collective over TP x DP x CP: EMA of each expert's centroid towards the mean of its tokens."""
        self._keep_fp32()
        n, d = self.centroids.shape
        device = self.centroids.device
        stats = self._stats if self._stats is not None else torch.zeros(n, d + 1, device=device)
        sample = self._sample if self._sample is not None else torch.zeros(n, d, device=device)
        self._stats = self._sample = None
        both = torch.zeros(n + 1, 2 * d + 1, device=device)  # one collective; row n: the hidden-state sum
        both[:stats.shape[0], :d + 1] = stats
        both[:n, d + 1:] = sample
        group = self.tp_dp_cp_group
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(both, group=group)
        sums, counts, sample = both[:n, :d], both[:n, d], both[:n, d + 1:]
        self.tokens_per_expert.copy_(counts)
        first = self.seeded_from_data == 0
        if self.center:
            h_sum, h_count = both[n, :d], both[n, d]
            mean = h_sum / h_count.clamp_min(1)
            blended = torch.where(first, mean, self.momentum * self.hidden_mean + (1 - self.momentum) * mean)
            self.hidden_mean.copy_(torch.where((h_count > 0) & torch.isfinite(mean).all(), blended,
                                               self.hidden_mean))
        if self.update == "running_mean":
            centroids, lengths = running_mean_update(self.centroids, sums, counts, self.running_sum_norm)
            self.running_sum_norm.copy_(lengths)
        else:
            centroids = ema_update(self.centroids, sums, counts, self.momentum)
        # Re-seed (all experts at the first update, idle ones later) from the sample: device-side choices,
        # no host sync; every rank holds the same counts and sample, so they agree.
        self.idle_updates.copy_(torch.where(counts > 0, torch.zeros_like(counts), self.idle_updates + 1))
        reseed = first.expand(n)
        if self.reseed_steps > 0:
            reseed = reseed | (self.idle_updates >= self.reseed_steps)
        usable = reseed & (sample.norm(dim=-1) > 0) & torch.isfinite(sample).all(dim=-1)
        self.centroids.copy_(torch.where(usable.unsqueeze(-1), F.normalize(sample, dim=-1), centroids))
        self.idle_updates.masked_fill_(usable, 0.0)
        self.running_sum_norm.masked_fill_(usable, 0.0)  # a re-seeded centroid starts a new running mean
        self.seeded_from_data.fill_(1.0)
        self._centroids_final = True


def kmeans_router_class(cfg) -> type:
    """A :class:`KMeansRouter` bound to this run's momentum and seed (what the layer spec should build)."""
    return type("KMeansRouter", (KMeansRouter,), {
        "momentum": cfg.moe.kmeans_momentum, "base_seed": cfg.training.seed,
        "temperature": cfg.moe.kmeans_temperature, "reseed_steps": cfg.moe.kmeans_reseed_steps,
        "update": cfg.moe.kmeans_update, "seed_sequences": cfg.moe.kmeans_seed_sequences,
        "center": cfg.moe.kmeans_center, "gate_grad": cfg.moe.kmeans_gate_grad})
