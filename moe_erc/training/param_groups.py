"""Parameter classes on the model: which class each parameter is, and what megatron's optimizer gives it.

The classes and what the config assigns them (``optimizer.param_rules`` / ``param_lr`` / ``param_weight_decay``,
``optimizer.symmetric_preset``) are defined with the config (:data:`moe_erc.config.PARAM_CLASSES`,
:func:`moe_erc.config.param_class_settings`); here they meet the model: :func:`param_class` reads a class off a
megatron GPTModel parameter name, :func:`tag_classes` marks every parameter, and :func:`megatron_overrides` turns
the per-class lr / weight decay into megatron's param-group overrides (the lr follows the run's warmup/decay,
ending at ``lr_c * min_lr / lr``). Classes, by parameter name:

==============  ====================================================================
embedding       word (and learned position) embeddings
output_layer    the LM head (untied)
router          the MoE router weight ``[experts, hidden]``
experts         routed experts: fc1 ``[gate; up]`` and fc2, stacked or not; AoE factors
shared_experts  the shared expert's fc1 / fc2
mlp             a dense layer's MLP
attention       QKV and output projections
vectors         every 1-D parameter: norms (QK-norm included), biases, the AoE/K-Means vectors
==============  ====================================================================
"""

from __future__ import annotations

from moe_erc.config import PARAM_CLASSES, param_class_settings


def param_class(name: str, param) -> str:
    """The class (one of :data:`PARAM_CLASSES`) of the parameter ``name`` of our GPT model."""
    if param.dim() < 2:
        return "vectors"
    if "word_embeddings" in name or "position_embeddings" in name:
        return "embedding"
    if name.startswith("output_layer") or ".output_layer." in name:
        return "output_layer"
    if name.endswith(".router.weight"):
        return "router"
    if "shared_experts" in name:
        return "shared_experts"
    if ".experts." in name:
        return "experts"
    if ".mlp." in name:
        return "mlp"
    return "attention"


def tag_classes(model_chunks) -> dict[str, str]:
    """Set ``param.param_class`` on every trainable parameter; returns ``{name: class}``."""
    classes = {}
    for chunk in model_chunks:
        for name, param in chunk.named_parameters():
            if param.requires_grad:
                param.param_class = classes[name] = param_class(name, param)
    return classes


def megatron_overrides(cfg) -> dict | None:
    """megatron ``config_overrides``: per-class ``max_lr`` / ``min_lr`` / ``wd_mult`` on top of megatron's standard
    rule (no decay on biases and 1-D parameters, unless ``vectors`` has its own decay). None: megatron's default."""
    _, lrs, wds = param_class_settings(cfg)
    if not lrs and not wds:
        return None
    from megatron.core.optimizer.optimizer_config import ParamKey, ParamPredicate

    o = cfg.optimizer
    overrides = {}
    if "vectors" not in wds:
        overrides[ParamKey(predicate=ParamPredicate(name="moe_erc_no_wd", fn=lambda p: p.dim() == 1))] = {
            "wd_mult": 0.0}
    for cls in PARAM_CLASSES:
        group = {}
        if cls in lrs:
            group["max_lr"] = lrs[cls]
            group["min_lr"] = lrs[cls] * (o.min_lr / o.lr if o.lr > 0 else 1.0)
        if cls in wds:
            group["wd_mult"] = wds[cls] / o.weight_decay if o.weight_decay > 0 else 0.0
        if group:
            key = ParamKey(predicate=ParamPredicate(name=f"moe_erc_class_{cls}",
                                                    fn=lambda p, c=cls: getattr(p, "param_class", None) == c))
            overrides[key] = group
    return overrides


def summarize(cfg) -> str:
    """``lr embedding 0.5, router 0.00075, ...; wd ...``: the per-class settings for the banner ('' if none)."""
    _, lrs, wds = param_class_settings(cfg)
    parts = []
    if lrs:
        parts.append("lr " + ", ".join(f"{c} {lrs[c]:g}" for c in PARAM_CLASSES if c in lrs))
    if wds:
        parts.append("wd " + ", ".join(f"{c} {wds[c]:g}" for c in PARAM_CLASSES if c in wds))
    return "; ".join(parts)
