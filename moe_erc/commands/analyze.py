"""``moe-erc analyze CHECKPOINT``: router–expert coupling of a trained model, post hoc, on one CPU.

Loads any checkpoint (whatever layout it was saved with: dist_checkpointing reshards it into one process)
and prints per MoE layer: the ERC loss with clean router rows at several alphas (the paper's Table 2),
the noise bounds ``eps`` (mean/min/max), router-row and gate-weight norms as mean ± std over experts (the
paper's Table 3); writes a heat-map of ``M`` per layer as PNG.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from moe_erc.config import Config
from moe_erc.errors import CheckpointError, UserError
from moe_erc.model import erc
from moe_erc.outputs import check_output_dir
from moe_erc.training import checkpoint


def layer_report(router_weight: torch.Tensor, gate: list[torch.Tensor], alphas: list[float]) -> dict:
    """Numbers for one layer from its ``[n, d]`` router and ``n`` gate weights ``[D, d]``."""
    with torch.no_grad():
        R = router_weight.detach().float()
        M = erc.activation_matrix(R, [w.detach().float() for w in gate])
        eps = erc.noise_bounds(R)
        router_norms = R.norm(dim=1)
        gate_norms = torch.stack([w.detach().float().norm() for w in gate])
        return {
            "erc_loss": {str(a): float(erc.erc_loss_from_matrix(M, a)) for a in alphas},
            "eps_mean": float(eps.mean()), "eps_min": float(eps.min()), "eps_max": float(eps.max()),
            "margin": float(erc.diagonal_margin(M)),
            "router_norm_mean": float(router_norms.mean()), "router_norm_std": float(router_norms.std()),
            "gate_norm_mean": float(gate_norms.mean()), "gate_norm_std": float(gate_norms.std()),
            "M": M.tolist(),
        }


def _has_router_matrix(cfg: Config) -> None:
    if cfg.moe.router != "topk":
        raise CheckpointError(f"the checkpoint uses moe.router={cfg.moe.router}, which has no router matrix to analyse")


def analyze(path: str, alphas: list[float]) -> dict:
    """Load the checkpoint in this process and return ``{"step", "layers": {layer: report}}``."""
    from moe_erc.model.layers.erc_layer import gate_weights, layer_slot

    with checkpoint.one_process_model(path, check=_has_router_matrix) as (_cfg, net, meta):
        layers = {}
        for module in net.modules():
            router, experts = getattr(module, "router", None), getattr(module, "experts", None)
            if router is not None and experts is not None and isinstance(getattr(router, "weight", None), torch.Tensor):
                gate = gate_weights(experts, net.config.gated_linear_unit)
                layers[layer_slot(router)] = layer_report(router.weight, gate, alphas)
        return {"checkpoint": meta["step_dir"], "step": meta.get("step"), "layers": dict(sorted(layers.items()))}


def print_table(result: dict, alphas: list[float]) -> None:
    print(f"checkpoint {result['checkpoint']} (step {result['step']}); ERC loss with clean router rows")
    header = ["layer", *[f"L(a={a:g})" for a in alphas], "eps mean [min, max]", "margin",
              "|R_i| mean±std", "|Wg_i| mean±std"]
    print(" | ".join(header))
    for layer, r in result["layers"].items():
        print(" | ".join([
            f"{layer:>5}", *[f"{r['erc_loss'][str(a)]:.4f}" for a in alphas],
            f"{r['eps_mean']:.4f} [{r['eps_min']:.4f}, {r['eps_max']:.4f}]", f"{r['margin']:+.4f}",
            f"{r['router_norm_mean']:.3f}±{r['router_norm_std']:.3f}",
            f"{r['gate_norm_mean']:.3f}±{r['gate_norm_std']:.3f}"]))


def write_heatmaps(result: dict, out_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = result["layers"]
    cols = min(4, len(layers))
    rows = -(-len(layers) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (layer, r) in zip(axes.flat, layers.items()):
        ax.axis("on")
        image = ax.imshow(r["M"], cmap="viridis")
        ax.set_title(f"layer {layer}: M[i, j]")
        ax.set_xlabel("expert j")
        ax.set_ylabel("proxy i (router row)")
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"M_step{result['step']}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="moe-erc analyze", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a step_* directory or a checkpoint root with 'latest'")
    parser.add_argument("--alphas", default="0.5,1,2,3,5", help="comma-separated alphas (default 0.5,1,2,3,5)")
    parser.add_argument("--out", default=None, help="where heat-maps go (default: <checkpoint>/analysis)")
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON (M omitted)")
    args = parser.parse_args(argv)
    try:
        alphas = [float(a) for a in args.alphas.split(",") if a.strip()]
    except ValueError:
        alphas = []
    if not alphas or not all(math.isfinite(a) and a >= 0 for a in alphas):
        raise UserError(f"--alphas '{args.alphas}' must be comma-separated numbers >= 0, e.g. 0.5,1,2")
    if args.out:
        check_output_dir(args.out)
    result = analyze(args.checkpoint, alphas)
    out_dir = Path(args.out) if args.out else Path(result["checkpoint"]) / "analysis"
    figure = write_heatmaps(result, out_dir) if result["layers"] else None
    if args.json:
        slim = {k: v for k, v in result.items() if k != "layers"}
        slim["layers"] = {k: {kk: vv for kk, vv in r.items() if kk != "M"} for k, r in result["layers"].items()}
        print(json.dumps(slim))
    else:
        print_table(result, alphas)
        if figure:
            print(f"heat-maps: {figure}")
    return 0
