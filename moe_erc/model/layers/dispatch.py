"""megatron's alltoall token dispatcher, with the local experts' token counts left on the device.

megatron-core's ``MoEAlltoAllTokenDispatcher`` copies the token counts to the host and waits for them in
every MoE layer and micro-batch, at EP = 1 too ("before_finish" / "before_permutation_2"), because its
``SequentialMLP`` and TE's grouped GEMM take split sizes as Python ints. Experts that take device counts
(``takes_device_counts = True``: :class:`moe_erc.model.layers.experts.GroupedExperts` and AoE's experts) do not
need that, so :class:`DeviceCountsDispatcher`

* at EP = TP = 1 without token dropping: copies nothing to the host, never synchronises, and skips
  megatron's permutation 2 and its inverse (``sort_chunks_by_idxs`` over one rank's chunks is the
  identity; megatron runs it with host split sizes anyway);
* otherwise: keeps megatron's one host copy + synchronise per layer and micro-batch for the all-to-all
  split sizes (a variable-size all-to-all needs them on the host) but hands the experts the counts that
  are still on the device (no copy back from pageable host memory).

The dispatcher is swapped in after the model is built (:func:`use_device_counts`); it adds no state, so
checkpoints and every other code path are unchanged.
"""

from __future__ import annotations

from moe_erc.compat import import_megatron

import_megatron()
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher  # noqa: E402


class DeviceCountsDispatcher(MoEAlltoAllTokenDispatcher):
    """``MoEAlltoAllTokenDispatcher`` whose token counts stay on the device; see the module docstring."""

    def _local_only(self) -> bool:
        """EP = TP = 1, dropless: every token stays on this rank and the output size is static."""
        c = self.config
        return (self.ep_size == 1 and self.tp_size == 1 and not self.drop_and_pad
                and c.moe_expert_capacity_factor is None and not c.moe_router_padding_for_quantization)

    def _maybe_dtoh_and_synchronize(self, point, tokens_per_expert=None):
        if not self._local_only():  # split sizes to the host (megatron's one copy and sync), counts stay
            super()._maybe_dtoh_and_synchronize(point, None)
        return tokens_per_expert

    def dispatch_postprocess(self, global_input_tokens, global_probs):
        if not self._local_only():
            return super().dispatch_postprocess(global_input_tokens, global_probs)
        tokens_per_expert, self.tokens_per_expert = self.tokens_per_expert, None
        return global_input_tokens, tokens_per_expert, global_probs

    def combine_preprocess(self, hidden_states):
        return hidden_states if self._local_only() else super().combine_preprocess(hidden_states)


def use_device_counts(model) -> int:
    """Swap :class:`DeviceCountsDispatcher` into every MoE layer whose experts take device counts and whose
    dispatcher is megatron's alltoall one. Returns how many layers it changed."""
    changed = 0
    for module in model.modules():
        dispatcher = getattr(module, "token_dispatcher", None)
        experts = getattr(module, "experts", None)
        if type(dispatcher) is MoEAlltoAllTokenDispatcher and getattr(experts, "takes_device_counts", False):
            dispatcher.__class__ = DeviceCountsDispatcher  # a stateless subclass: same attributes
            changed += 1
    return changed
