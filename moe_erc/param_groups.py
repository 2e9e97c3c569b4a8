"""Parameter classes and what each gets from the optimizer: update rule, learning rate, weight decay.

``optimizer.param_rules`` / ``param_lr`` / ``param_weight_decay`` map a class to its rule (a name in
:data:`moe_erc.symmetric.RULES`), its peak learning rate (it follows the run's warmup/decay, ending at
``lr_c * min_lr / lr``) and its decoupled weight decay; ``optimizer.symmetric_preset`` fills them (and a few
``muon_*`` keys) with a published assignment, and explicit entries win over the preset's. Classes, by
megatron GPTModel parameter name:

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

Presets (docs/optimizers.md, "The authors' OLMoE stack"): ``paper`` is Lau & Su's OLMoE run from their code
(timlautk/equivariant_optimizers, ``train_olmoe.py``: RowNormM for the embedding, centred RowNormM for the LM head
and the router, head-wise Muon for attention, per-expert Muon, AdamW for vectors); ``paper_adamw_control`` is
their control (AdamW for embedding, LM head and router, the rest unchanged).
"""

from __future__ import annotations

from typing import Any

PARAM_CLASSES = ("embedding", "output_layer", "router", "experts", "shared_experts", "mlp", "attention", "vectors")

_PAPER_MATRICES = {"attention": 5e-3, "experts": 5e-3, "shared_experts": 5e-3, "mlp": 5e-3}
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {
        # optimizer keys the preset sets unless the config sets them: Muon as their Muon (Keller Jordan's
        # max(1, out/in)^0.5 scale, no extra factor, Polar Express coefficients)
        "fields": {"name": "symmetric", "muon_scale_mode": "shape_scaling", "muon_extra_scale_factor": 1.0,
                   "muon_coefficient_type": "polar_express", "muon_momentum": 0.95, "muon_nesterov": True},
        "rules": {"embedding": "row_unit", "output_layer": "centered_row_unit", "router": "centered_row_unit",
                  "attention": "spectral_heads", "experts": "spectral", "shared_experts": "spectral",
                  "mlp": "spectral", "vectors": "adamw"},
        "lr": {"embedding": 0.5, "output_layer": 5e-3, "router": 7.5e-4, **_PAPER_MATRICES, "vectors": 1e-2},
        "weight_decay": {"embedding": 0.0, "output_layer": 0.0, "router": 0.0, "attention": 1e-3, "experts": 1e-3,
                         "shared_experts": 1e-3, "mlp": 1e-3, "vectors": 1e-3},
    },
}
PRESETS["paper_adamw_control"] = {
    "fields": PRESETS["paper"]["fields"],
    "rules": {**PRESETS["paper"]["rules"], "embedding": "adamw", "output_layer": "adamw", "router": "adamw"},
    "lr": {**PRESETS["paper"]["lr"], "embedding": 5e-4, "output_layer": 5e-4, "router": 7.5e-4},
    "weight_decay": PRESETS["paper"]["weight_decay"],
}
PRESET_NAMES = ("none", *PRESETS)
# A router whose scores change under a shared shift (sigmoid) has no shift symmetry to keep: uncentred rule.
UNCENTRED = {"centered_row_unit": "row_unit", "centered_row_norm": "row_norm", "left_spectral": "row_norm",
             "left_polar_nuclear": "row_unit"}


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


def preset_fields(data: dict) -> dict:
    """The optimizer section ``data`` (raw YAML) with the preset's ``fields`` filled in where it sets none."""
    preset = PRESETS.get(data.get("symmetric_preset", "none")) if isinstance(data, dict) else None
    if preset is None:
        return data
    return {**preset["fields"], **data}


def resolve(cfg) -> tuple[dict[str, str], dict[str, float], dict[str, float]]:
    """``(rules, lr, weight_decay)`` per class: the preset's entries updated by the config's explicit ones."""
    o = cfg.optimizer
    preset = PRESETS.get(o.symmetric_preset, {})
    rules = {**preset.get("rules", {}), **o.param_rules}
    if "router" in rules and cfg.moe.moe_router_score_function == "sigmoid" and "router" not in o.param_rules:
        rules["router"] = UNCENTRED.get(rules["router"], rules["router"])
    return rules, {**preset.get("lr", {}), **o.param_lr}, {**preset.get("weight_decay", {}), **o.param_weight_decay}


def problems(cfg):
    """One line per inconsistent per-class setting (config validation)."""
    o = cfg.optimizer
    rules, lrs, wds = resolve(cfg)
    if o.symmetric_preset != "none" and o.name != "symmetric":
        yield (f"optimizer.symmetric_preset={o.symmetric_preset} is an assignment of the symmetric stack; set "
               f"optimizer.name=symmetric (or leave it unset)")
    if o.name == "adamw" and any(rule != "adamw" for rule in rules.values()):
        yield "optimizer.param_rules needs optimizer.name=muon or symmetric (AdamW has one rule for every class)"
    if rules.get("vectors", "adamw") != "adamw":
        yield f"optimizer.param_rules: vectors (1-D parameters) can only use adamw, not {rules['vectors']}"
    for cls, lr in lrs.items():
        if lr < 0:
            yield f"optimizer.param_lr.{cls}={lr} must be >= 0"
    for cls, wd in wds.items():
        if wd < 0:
            yield f"optimizer.param_weight_decay.{cls}={wd} must be >= 0"
        elif wd > 0 and o.weight_decay == 0:
            yield (f"optimizer.param_weight_decay.{cls}={wd} needs optimizer.weight_decay > 0 (per-class decay is "
                   f"megatron's multiple of it)")


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
    _, lrs, wds = resolve(cfg)
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
    _, lrs, wds = resolve(cfg)
    parts = []
    if lrs:
        parts.append("lr " + ", ".join(f"{c} {lrs[c]:g}" for c in PARAM_CLASSES if c in lrs))
    if wds:
        parts.append("wd " + ", ".join(f"{c} {wds[c]:g}" for c in PARAM_CLASSES if c in wds))
    return "; ".join(parts)
