"""``moe-erc study``: every method x several seeds on one model and token budget, then the evidence.

    moe-erc study                    # configs/study.yaml, 8 methods x 3 seeds (about 2 h on 2 CPU cores)
    moe-erc study --quick            # 1 seed, 60 steps: a smoke run (minutes)
    moe-erc study --optimizers       # AdamW vs Muon vs symmetric, vanilla and ERC routing -> docs/optimizers

Runs go to ``--runs`` (default ``runs/study/<method>-s<seed>``); a run whose final checkpoint exists is
skipped, so an interrupted study resumes. Each finished run is analysed post hoc (``moe-erc analyze``: ERC
loss with clean rows at alpha 0.5/1/2, eps, M) and the study writes ``--out`` (default ``docs/study``):
``README.md`` with mean ± std over seeds per method, the paper's claims (a)-(d) each marked reproduced /
not reproduced / inconclusive with its numbers, and PNG figures. It commits nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from moe_erc.outputs import check_output_dir

_KM = ["moe.router=kmeans", "moe.moe_router_load_balancing_type=none"]
# name -> (label, overrides). Same model, data order (the seed) and token budget for all.
METHODS = {
    "vanilla": ("vanilla (aux loss 0.01)", []),
    "erc-0.25": ("ERC alpha=0.25", ["erc.enabled=true", "erc.alpha=0.25"]),
    "erc-0.5": ("ERC alpha=0.5", ["erc.enabled=true", "erc.alpha=0.5"]),
    "erc-1": ("ERC alpha=1", ["erc.enabled=true", "erc.alpha=1.0"]),
    "erc-2": ("ERC alpha=2", ["erc.enabled=true", "erc.alpha=2.0"]),
    "aoe": ("AoE", ["moe.router=aoe"]),
    "kmeans": ("K-Means", list(_KM)),
    "auxfree": ("aux-loss-free", ["moe.moe_router_score_function=sigmoid", "moe.moe_router_enable_expert_bias=true",
                                  "moe.moe_router_load_balancing_type=none"]),
    # --optimizers: the same routings trained with megatron's Muon and the symmetric stack.
    "muon": ("Muon, vanilla", ["optimizer.name=muon"]),
    "muon-erc-1": ("Muon, ERC alpha=1", ["optimizer.name=muon", "erc.enabled=true", "erc.alpha=1.0"]),
    "symmetric": ("symmetric, vanilla", ["optimizer.name=symmetric"]),
    "symmetric-erc-1": ("symmetric, ERC alpha=1", ["optimizer.name=symmetric", "erc.enabled=true", "erc.alpha=1.0"]),
    # --kmeans-ablation: what balances the K-Means router, one option at a time on the un-centred
    # router (the default before the ablation picked centring, configs/study.yaml); and a router with no
    # balancing at all, for the router-geometry claim.
    "kmeans-uncentred": ("K-Means, un-centred (the earlier default)", [*_KM, "moe.kmeans_center=false"]),
    "kmeans-running": ("K-Means, running mean", [*_KM, "moe.kmeans_center=false", "moe.kmeans_update=running_mean"]),
    "kmeans-seed16": ("K-Means, seeds from 16 sequences", [*_KM, "moe.kmeans_center=false",
                                                           "moe.kmeans_seed_sequences=16"]),
    "kmeans-reseed10": ("K-Means, re-seed after 10 idle steps", [*_KM, "moe.kmeans_center=false",
                                                                 "moe.kmeans_reseed_steps=10"]),
    "kmeans-center": ("K-Means, centred hidden states", [*_KM, "moe.kmeans_center=true"]),
    "kmeans-nograd": ("K-Means, gates without gradient", [*_KM, "moe.kmeans_center=false",
                                                          "moe.kmeans_gate_grad=false"]),
    "noaux": ("no balancing (aux loss 0)", ["moe.moe_router_load_balancing_type=none", "moe.moe_aux_loss_coeff=0"]),
    # --optimizer-ablation: the authors' stack against their control, and where Muon's anti-coupling
    # comes from (Muon on one component at a time; Muon without the aux loss).
    "paper": ("Lau & Su's OLMoE stack (symmetric_preset: paper)", ["optimizer.symmetric_preset=paper"]),
    "paper-control": ("their control: AdamW for embedding, LM head, router",
                      ["optimizer.symmetric_preset=paper_adamw_control"]),
    "muon-router": ("Muon on the router only (AdamW elsewhere)", [
        "optimizer.name=muon", "optimizer.param_rules={attention: adamw, experts: adamw, shared_experts: adamw, "
                               "mlp: adamw}"]),
    "muon-experts": ("Muon on the routed experts only (AdamW elsewhere)", [
        "optimizer.name=muon", "optimizer.param_rules={attention: adamw, router: adamw, shared_experts: adamw, "
                               "mlp: adamw}"]),
    "muon-aux0": ("Muon, aux loss 0", ["optimizer.name=muon", "moe.moe_router_load_balancing_type=none",
                                       "moe.moe_aux_loss_coeff=0"]),
}
ROUTING_METHODS = ["vanilla", "erc-0.25", "erc-0.5", "erc-1", "erc-2", "aoe", "kmeans", "auxfree"]
OPTIMIZER_METHODS = ["vanilla", "erc-1", "muon", "muon-erc-1", "symmetric", "symmetric-erc-1"]
# "kmeans" is the config's K-Means (centred in configs/study.yaml); the others change one option of the
# un-centred router. docs/study/kmeans ran before centring became the default: its "K-Means" row is un-centred.
KMEANS_VARIANTS = ["kmeans", "kmeans-uncentred", "kmeans-running", "kmeans-seed16", "kmeans-reseed10",
                   "kmeans-nograd"]
KMEANS_METHODS = ["vanilla", "auxfree", "noaux", *KMEANS_VARIANTS]
ANTI_COUPLING = ["muon-router", "muon-experts", "muon-aux0"]  # one seed each: the sign is what is asked
ABLATION_METHODS = ["paper", "paper-control", *ANTI_COUPLING]
# The authors' figures: symmetric embedding/LM-head/router rules end 0.02-0.04 nats below their AdamW control.
PAPER_GAP = (0.02, 0.04)
# A coupling this far from 0 has a sign (seed spread of Muon's coupling in docs/optimizers: 0.02-0.05).
CLEAR_COUPLING = 0.1
# "Modest perplexity increase": at most this much validation loss (nats) above aux-loss balancing.
MODEST_LOSS_INCREASE = 0.05
# One colour per method in every figure.
COLORS = {"vanilla": "#444444", "erc-0.25": "#08306b", "erc-0.5": "#2171b5", "erc-1": "#6baed6",
          "erc-2": "#c6dbef", "aoe": "#d94801", "kmeans": "#238b45", "auxfree": "#807dba",
          "muon": "#ce1256", "muon-erc-1": "#f1b6da", "symmetric": "#8c510a", "symmetric-erc-1": "#dfc27d",
          "kmeans-running": "#41ab5d", "kmeans-uncentred": "#006d2c", "kmeans-seed16": "#74c476",
          "kmeans-reseed10": "#a1d99b", "kmeans-center": "#00441b", "kmeans-nograd": "#c7e9c0", "noaux": "#bdbdbd",
          "paper": "#543005", "paper-control": "#bf812d", "muon-router": "#e7298a", "muon-experts": "#980043",
          "muon-aux0": "#fa9fb5"}
ALPHAS = (0.5, 1.0, 2.0)
SEEDS = (1234, 2345, 3456)
QUICK = ["training.train_iters=60", "training.eval_interval=20", "training.eval_iters=4",
         "optimizer.lr_warmup_iters=6", "logging.log_interval=10", "checkpoint.save_interval=60"]


# ---------------------------------------------------------------------------------------------- running


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _finished(run_dir: Path, train_iters: int) -> bool:
    from moe_erc.training import checkpoint

    latest = checkpoint.find_latest(run_dir / "checkpoints", warn=lambda _: None)
    return latest is not None and checkpoint.read_metadata(latest).get("step") == train_iters


def run_all(config: str, methods: list[str], seeds: list[int], runs: Path, extra: list[str],
            say=print, jobs: int = 1, seeds_for: dict[str, list[int]] | None = None) -> dict[tuple[str, int], Path]:
    """Train every (method, seed) not finished yet, one process each, ``jobs`` at a time; returns their run
    directories. With ``jobs`` > 1 each process gets ``cpu_count // jobs`` threads (OMP_NUM_THREADS): small
    models scale poorly across threads, so 2 one-thread runs on 2 cores train ~1.7x the tokens of one.
    ``seeds_for``: a method's own seeds (default ``seeds``)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from moe_erc.config import load_config
    from moe_erc.errors import UserError

    train_iters = load_config(config, extra).training.train_iters
    done, todo = {}, []
    for method in methods:
        for seed in (seeds_for or {}).get(method, seeds):
            run_dir = runs / f"{method}-s{seed}"
            done[(method, seed)] = run_dir
            if _finished(run_dir, train_iters):
                say(f"study: {run_dir.name} already finished, skipped")
            else:
                todo.append((method, seed, run_dir))
    lock = threading.Lock()

    def tell(message: str) -> None:  # one line at a time from the worker threads
        with lock:
            say(message)

    env = dict(os.environ)
    if jobs > 1:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))

    def train(item) -> str | None:
        method, seed, run_dir = item
        tell(f"study: training {run_dir.name}")
        start = time.perf_counter()
        cmd = [sys.executable, "-m", "moe_erc", "train", config, *METHODS[method][1], *extra,
               f"training.seed={seed}", f"logging.run_dir={run_dir}", "logging.progress=false"]
        if jobs > 1:  # runs at once must not build the same sample-index cache files side by side
            cmd.append(f"data.cache_dir={run_dir / 'index-cache'}")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            return f"study run {run_dir.name} failed ({proc.stderr.strip().splitlines()[-1:]})"
        tell(f"study: {run_dir.name} done in {time.perf_counter() - start:.0f} s")
        return None

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        failures = [f for f in pool.map(train, todo) if f]
    if failures:
        raise UserError("; ".join(failures) + "; rerun `moe-erc study` to resume")
    return done


def _analyze(run_dir: Path) -> dict | None:
    """What ``moe-erc analyze`` computes for the final checkpoint, M included (None without a router matrix)."""
    from moe_erc.commands.analyze import analyze
    from moe_erc.errors import CheckpointError

    try:
        return analyze(str(run_dir / "checkpoints"), list(ALPHAS))
    except CheckpointError:  # AoE / K-Means: no router matrix to analyse
        return None


# ---------------------------------------------------------------------------------------------- measuring


def measure(config: str, method: str, run_dir: Path, extra: list[str]) -> dict:
    """The numbers of one finished run."""
    from moe_erc.config import load_config
    from moe_erc.model.flops import step_flops

    records = _records(run_dir)
    valid = [r for r in records if r["split"] == "valid"]
    train = [r for r in records if r["split"] == "train"]
    from moe_erc.training import checkpoint

    cfg = load_config(config, [*METHODS[method][1], *extra])
    vocab = checkpoint.read_metadata(checkpoint.find_latest(run_dir / "checkpoints"))["padded_vocab_size"]
    flops = step_flops(cfg, 1, vocab)
    out = {
        "valid_curve": [(r["step"], r["lm_loss"]) for r in valid],
        "valid_loss": valid[-1]["lm_loss"],
        "maxvio_curve": [(r["step"], r["maxvio"]) for r in train if r.get("maxvio") is not None],
        "maxvio_valid": valid[-1].get("maxvio_global"),
        "dead_experts": statistics.mean(r.get("dead_experts") or 0 for r in train) if train else None,
        "coupling": valid[-1].get("coupling"),
        "coupling_topk": valid[-1].get("coupling_topk"),
        "router_cosine": _mean_layers(next((r.get("router_cosine") for r in reversed(train)
                                            if r.get("router_cosine")), None)),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in train) if train else None,
        "flops_per_token": (flops.tokens_per_step * flops.per_token_total + flops.erc_per_gpu) / flops.tokens_per_step,
    }
    analysis = _analyze(run_dir)
    if analysis is not None:
        layers = sorted(analysis["layers"], key=int)
        out["posthoc"] = {a: [analysis["layers"][k]["erc_loss"][str(a)] for k in layers] for a in ALPHAS}
        out["eps"] = [analysis["layers"][k]["eps_mean"] for k in layers]
        out["margin"] = [analysis["layers"][k]["margin"] for k in layers]
        out["M"] = [analysis["layers"][k]["M"] for k in layers]
    return out


def _mean_layers(values) -> float | None:
    """Mean over the layers that have a value (None: no layer has one); a number is its own mean."""
    if isinstance(values, (int, float)):
        return float(values)
    present = [v for v in (values or []) if v is not None]
    return statistics.mean(present) if present else None


def _mean_std(values) -> tuple[float, float]:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return float("nan"), float("nan")
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _paired(runs: list[dict], base: list[dict]) -> tuple[float, float]:
    """Mean ± std over seeds of ``runs`` minus ``base`` validation loss, seed by seed."""
    return _mean_std(r["valid_loss"] - b["valid_loss"] for r, b in zip(runs, base))


def _fmt(pair, digits=4) -> str:
    mean, std = pair
    return "n/a" if math.isnan(mean) else f"{mean:.{digits}f} ± {std:.{digits}f}"


# ---------------------------------------------------------------------------------------------- claims


def claims(results: dict[str, list[dict]]) -> list[tuple[str, str, str]]:
    """(claim, verdict, evidence) for the paper's claims (a)-(d), from per-method lists of run results."""
    out = []
    van, erc1 = results.get("vanilla"), results.get("erc-1")
    if van and erc1 and "posthoc" in van[0] and "posthoc" in erc1[0]:
        layers = len(van[0]["posthoc"][1.0])
        erc_layers = [_mean_std(r["posthoc"][1.0][k] for r in erc1)[0] for k in range(layers)]
        van_layers = [_mean_std(r["posthoc"][1.0][k] for r in van)[0] for k in range(layers)]
        ok = max(erc_layers) < 1e-3 and min(van_layers) > 1e-3
        verdict = "reproduced" if ok else ("not reproduced" if max(erc_layers) >= min(van_layers) else "inconclusive")
        out.append(("(a) ERC (alpha=1) drives the post-hoc ERC loss at alpha=1 to ~0 in every layer; vanilla keeps it > 0",
                    verdict, f"per layer, ERC: {', '.join(f'{v:.4f}' for v in erc_layers)}; "
                             f"vanilla: {', '.join(f'{v:.4f}' for v in van_layers)} (test: every ERC layer < 1e-3, "
                             f"every vanilla layer > 1e-3)"))
    ercs = [m for m in ("erc-0.25", "erc-0.5", "erc-1", "erc-2") if results.get(m) and "eps" in results[m][0]]
    if len(ercs) >= 2:
        eps = [(m, _mean_std(statistics.mean(r["eps"]) for r in results[m])) for m in ercs]
        means = [e[1][0] for e in eps]
        falling = all(a > b for a, b in zip(means, means[1:]))
        spread = max(e[1][1] for e in eps)
        if min(len(results[m]) for m in ercs) < 2:
            verdict = "inconclusive"  # one seed: no spread to judge a difference against
        else:
            verdict = "reproduced" if falling and means[0] - means[-1] > 2 * spread else (
                "inconclusive" if falling or abs(means[0] - means[-1]) <= 2 * spread else "not reproduced")
        out.append(("(b) eps (mean over experts and layers) falls as alpha rises", verdict,
                    "; ".join(f"{m}: {_fmt(s)}" for m, s in eps) + " (test: strictly falling, and first - last > "
                    "2 x the largest seed std; one seed = inconclusive)"))
    if van and erc1:
        paired = [e["valid_loss"] - v["valid_loss"] for e, v in zip(erc1, van)]
        mean, std = _mean_std(paired)
        if len(paired) < 2:
            verdict = "inconclusive"
        else:
            verdict = "reproduced" if mean <= std else ("not reproduced" if mean > 2 * std else "inconclusive")
        out.append(("(c) ERC's validation loss <= vanilla's within seed noise", verdict,
                    f"seed-paired ERC (alpha=1) - vanilla: {mean:+.4f} ± {std:.4f} over {len(paired)} seed(s) "
                    f"(test: mean difference <= its std; > 2 std = not reproduced; one seed = inconclusive)"))
    aoe = results.get("aoe")
    if aoe and erc1:
        a, e = aoe[0]["flops_per_token"], erc1[0]["flops_per_token"]
        ta, te = _mean_std(r["tokens_per_s"] for r in aoe)[0], _mean_std(r["tokens_per_s"] for r in erc1)[0]
        out.append(("(d) AoE costs more per token than ERC", "reproduced" if a > e else "not reproduced",
                    f"analytic training FLOPs per token: AoE {a / 1e6:.2f} M vs ERC {e / 1e6:.2f} M ({a / e:.2f}x); "
                    f"measured on this CPU: {ta:,.0f} vs {te:,.0f} tokens/s"))
    return out


def optimizer_rows(results: dict[str, list[dict]]) -> list[str]:
    """Markdown rows: each (optimizer, routing) run set vs AdamW on the same routing, seed-paired."""
    pairs = [("AdamW", "vanilla", "vanilla"), ("AdamW", "ERC alpha=1", "erc-1"), ("Muon", "vanilla", "muon"),
             ("Muon", "ERC alpha=1", "muon-erc-1"), ("symmetric", "vanilla", "symmetric"),
             ("symmetric", "ERC alpha=1", "symmetric-erc-1")]
    rows = ["| optimizer | routing | validation loss | - AdamW, seed-paired | MaxVio (valid) | eps "
            "| post-hoc ERC loss alpha=1 (max over layers) | tokens/s |", "|---|---|---|---|---|---|---|---|"]
    for opt, routing, method in pairs:
        runs = results.get(method)
        if not runs:
            continue
        base = results.get("vanilla" if routing == "vanilla" else "erc-1")
        delta = "—" if opt == "AdamW" or not base else \
            _fmt(_paired(runs, base))
        eps = _fmt(_mean_std(statistics.mean(r["eps"]) for r in runs), 3) if "eps" in runs[0] else "n/a"
        post = _fmt(_mean_std(max(r["posthoc"][1.0]) for r in runs), 4) if "posthoc" in runs[0] else "n/a"
        rows.append(f"| {opt} | {routing} | {_fmt(_mean_std(r['valid_loss'] for r in runs))} | {delta} | "
                    f"{_fmt(_mean_std(r['maxvio_valid'] for r in runs), 3)} | {eps} | {post} | "
                    f"{_mean_std(r['tokens_per_s'] for r in runs)[0]:,.0f} |")
    # What the per-class rules add over Muon-for-every-matrix (a measurement, not one of the paper's claims).
    for routing, muon, sym in (("vanilla", "muon", "symmetric"), ("ERC alpha=1", "muon-erc-1", "symmetric-erc-1")):
        if results.get(muon) and results.get(sym):
            n = min(len(results[sym]), len(results[muon]))
            rows += ["", f"Seed-paired symmetric − Muon ({routing} routing): "
                         f"{_fmt(_paired(results[sym], results[muon]))} over {n} seed(s)."]
    return rows


def optimizer_claims(results: dict[str, list[dict]]) -> list[tuple[str, str, str]]:
    """(claim, verdict, evidence): the optimizer paper's claim, and ERC under a row-mean-blind router update."""
    out = []
    for routing, base_name, name in (("vanilla", "vanilla", "symmetric"), ("ERC alpha=1", "erc-1", "symmetric-erc-1")):
        base, runs = results.get(base_name), results.get(name)
        if not (base and runs):
            continue
        mean, std = _paired(runs, base)
        n = min(len(base), len(runs))
        verdict = "inconclusive" if n < 2 else (
            "reproduced" if mean < 0 and -mean > 2 * std else ("not reproduced" if mean > 2 * std else "inconclusive"))
        out.append((f"(e) the symmetric stack reaches a lower validation loss than AdamW ({routing} routing)", verdict,
                    f"seed-paired symmetric - AdamW: {mean:+.4f} ± {std:.4f} over {n} seed(s) (test: mean < 0 by more "
                    f"than 2 std = reproduced; > 2 std above 0 = not reproduced)"))
    sym, adam = results.get("symmetric-erc-1"), results.get("erc-1")
    if sym and adam and "posthoc" in sym[0] and "posthoc" in adam[0]:
        s_max = _mean_std(max(r["posthoc"][1.0]) for r in sym)[0]
        a_max = _mean_std(max(r["posthoc"][1.0]) for r in adam)[0]
        out.append(("(f) ERC still meets its constraint when the router update ignores the row mean "
                    "(centered row-norm)", "reproduced" if s_max < 1e-3 else "not reproduced",
                    f"post-hoc ERC loss at alpha=1, max over layers: symmetric {s_max:.4f} vs AdamW {a_max:.4f} "
                    f"(test: < 1e-3)"))
    return out


def kmeans_rows(results: dict[str, list[dict]]) -> list[str]:
    """Markdown rows: each K-Means variant's MaxVio and validation loss, seed-paired against aux-loss balancing
    (vanilla) and aux-loss-free balancing."""
    rows = ["| K-Means variant | MaxVio (valid) | − aux loss | − aux-loss-free | validation loss − aux loss | "
            "− aux-loss-free | dead experts | coupling |", "|---|---|---|---|---|---|---|---|"]
    for name in KMEANS_VARIANTS:
        runs = results.get(name)
        if not runs:
            continue
        cells = [_fmt(_mean_std(r["maxvio_valid"] for r in runs), 3)]
        for base in ("vanilla", "auxfree"):
            b = results.get(base)
            cells.append(_fmt(_mean_std(r["maxvio_valid"] - v["maxvio_valid"] for r, v in zip(runs, b)), 3) if b else "—")
        for base in ("vanilla", "auxfree"):
            b = results.get(base)
            cells.append(_fmt(_paired(runs, b)) if b else "—")
        cells += [_fmt(_mean_std(r["dead_experts"] for r in runs), 2), _fmt(_mean_std(r["coupling"] for r in runs), 3)]
        rows.append(f"| {METHODS[name][0]} | " + " | ".join(cells) + " |")
    return rows


def kmeans_claims(results: dict[str, list[dict]]) -> list[tuple[str, str, str]]:
    """(claim, verdict, evidence): the K-Means paper's balance claim (per variant) and the router-geometry claim.

    Tests, fixed before the runs: (g) reproduced when the variant's validation MaxVio is below aux-loss's and
    aux-loss-free's by more than 2 seed-paired std each, and its seed-paired validation loss minus aux-loss's is at
    most MODEST_LOSS_INCREASE; not reproduced when its MaxVio is above either by more than 2 std; else
    inconclusive (one seed: inconclusive). (h) the mean |cos| between distinct router rows with aux loss 0.01
    over that with no balancing; reproduced when >= 2 (the paper: "nearly three times"), not reproduced when
    <= 1.2, else inconclusive; aux-loss-free shown beside it.
    """
    out = []
    van, free = results.get("vanilla"), results.get("auxfree")
    for name in KMEANS_VARIANTS:
        runs = results.get(name)
        if not (runs and van and free):
            continue
        n = min(len(runs), len(van), len(free))
        below = [_mean_std(r["maxvio_valid"] - b["maxvio_valid"] for r, b in zip(runs, base)) for base in (van, free)]
        loss = _paired(runs, van)
        if n < 2:
            verdict = "inconclusive"
        elif all(m < 0 and -m > 2 * sd for m, sd in below) and loss[0] <= MODEST_LOSS_INCREASE:
            verdict = "reproduced"
        elif any(m > 2 * sd for m, sd in below):
            verdict = "not reproduced"
        else:
            verdict = "inconclusive"
        out.append((f"(g) {METHODS[name][0]} has the lowest load imbalance, with a modest perplexity increase",
                    verdict, f"seed-paired validation MaxVio minus aux loss {_fmt(below[0], 3)}, minus aux-loss-free "
                             f"{_fmt(below[1], 3)}; validation loss minus aux loss {_fmt(loss)} over {n} seed(s) "
                             f"(test: MaxVio below both by > 2 std and loss increase <= {MODEST_LOSS_INCREASE}; "
                             f"above either by > 2 std = not reproduced)"))
    none = results.get("noaux")
    if van and none and all(r.get("router_cosine") is not None for r in van + none):
        ratio = _mean_std(v["router_cosine"] / z["router_cosine"] for v, z in zip(van, none))
        verdict = "inconclusive" if min(len(van), len(none)) < 2 else (
            "reproduced" if ratio[0] >= 2 else ("not reproduced" if ratio[0] <= 1.2 else "inconclusive"))
        extra = ""
        if free and all(r.get("router_cosine") is not None for r in free):
            extra = f"; aux-loss-free / none {_fmt(_mean_std(f['router_cosine'] / z['router_cosine'] for f, z in zip(free, none)), 2)}"
        out.append(("(h) the auxiliary load-balancing loss makes router rows more similar (paper: nearly 3x)", verdict,
                    f"mean |cos| between distinct router rows, aux loss 0.01 / none: {_fmt(ratio, 2)} over "
                    f"{min(len(van), len(none))} seed(s){extra} (test: >= 2 reproduced, <= 1.2 not reproduced)"))
    return out


def ablation_claims(results: dict[str, list[dict]], muon_coupling: float | None = None) -> list[tuple[str, str, str]]:
    """(claim, verdict, evidence) for the optimizer ablation. Tests, fixed before the runs:

    (i) the authors' stack vs its control, seed-paired validation loss control - preset: reproduced when > 0
    by more than 2 std (n >= 2), not reproduced when < 0 by more than 2 std, else inconclusive; the mean is
    shown beside the paper's 0.02-0.04. (j) the hypothesis that spectral updates on the experts produce the
    anti-coupling: supported when Muon on the experts alone gives coupling < -CLEAR_COUPLING and Muon on the
    router alone does not; refuted when Muon on the experts alone gives coupling > -CLEAR_COUPLING (no clear
    negative sign); else inconclusive. (k) the aux loss is not what makes it: Muon without the aux loss still
    has coupling < -CLEAR_COUPLING (reproduced), or not (> -CLEAR_COUPLING: the aux loss takes part).
    ``muon_coupling``: Muon everywhere, for the evidence line (docs/optimizers).
    """
    out = []
    paper, control = results.get("paper"), results.get("paper-control")
    if paper and control:
        mean, std = _paired(control, paper)
        n = min(len(paper), len(control))
        verdict = "inconclusive" if n < 2 else (
            "reproduced" if mean > 0 and mean > 2 * std else ("not reproduced" if -mean > 2 * std else "inconclusive"))
        out.append(("(i) the authors' symmetric rules for embedding, LM head and router reach a lower validation loss "
                    "than their AdamW control (paper: 0.02-0.04 nats)", verdict,
                    f"seed-paired control - preset: {mean:+.4f} ± {std:.4f} over {n} seed(s) (paper: "
                    f"+{PAPER_GAP[0]}..+{PAPER_GAP[1]}; test: > 0 by more than 2 std = reproduced)"))

    def coupling(name):
        runs = results.get(name)
        return statistics.mean(r["coupling"] for r in runs) if runs and all(
            r.get("coupling") is not None for r in runs) else None

    experts, router, aux0 = coupling("muon-experts"), coupling("muon-router"), coupling("muon-aux0")
    base = f"; Muon everywhere {muon_coupling:+.3f}" if muon_coupling is not None else ""
    if experts is not None and router is not None:
        verdict = ("supported" if experts < -CLEAR_COUPLING and router >= -CLEAR_COUPLING else
                   "refuted" if experts >= -CLEAR_COUPLING else "inconclusive")
        out.append(("(j) spectral (Muon) updates on the experts produce the router-expert anti-coupling", verdict,
                    f"final validation coupling: Muon on the experts only {experts:+.3f}, on the router only "
                    f"{router:+.3f}{base} (test: experts < -{CLEAR_COUPLING} and router >= -{CLEAR_COUPLING} = "
                    f"supported; experts >= -{CLEAR_COUPLING} = refuted)"))
    if aux0 is not None:
        out.append(("(k) Muon's anti-coupling does not need the aux loss",
                    "reproduced" if aux0 < -CLEAR_COUPLING else "not reproduced",
                    f"final validation coupling, Muon with aux loss 0: {aux0:+.3f}{base} (test: < -{CLEAR_COUPLING})"))
    return out


# ---------------------------------------------------------------------------------------------- writing


def figures(results: dict[str, list[dict]], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        names.append(name)

    fig, ax = plt.subplots(figsize=(7, 4))
    for method, runs in results.items():
        steps = [s for s, _ in runs[0]["valid_curve"]]
        stats = [_mean_std(r["valid_curve"][i][1] for r in runs) for i in range(len(steps))]
        mean = [m for m, _ in stats]
        ax.plot(steps, mean, color=COLORS[method], label=METHODS[method][0])
        ax.fill_between(steps, [m - s for m, s in stats], [m + s for m, s in stats], color=COLORS[method], alpha=0.15)
    ax.set(xlabel="training step", ylabel="validation LM loss (nats/token)", title="Validation loss (mean ± std over seeds)")
    ax.legend(fontsize=7)
    save(fig, "valid_loss.png")

    with_matrix = [m for m in results if "posthoc" in results[m][0]]
    if with_matrix:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        layers = len(results[with_matrix[0]][0]["eps"])
        width = 0.8 / len(with_matrix)
        for i, method in enumerate(with_matrix):
            runs = results[method]
            xs = [k + i * width for k in range(layers)]
            post = [_mean_std(r["posthoc"][1.0][k] for r in runs) for k in range(layers)]
            eps = [_mean_std(r["eps"][k] for r in runs) for k in range(layers)]
            axes[0].bar(xs, [m for m, _ in post], width, yerr=[s for _, s in post], color=COLORS[method],
                        label=METHODS[method][0])
            axes[1].bar(xs, [m for m, _ in eps], width, yerr=[s for _, s in eps], color=COLORS[method])
        for ax, label in zip(axes, ("post-hoc ERC loss at alpha=1 (clean rows)", "eps: mean noise bound")):
            ax.set_xticks([k + 0.4 - width / 2 for k in range(layers)], [f"layer {k + 1}" for k in range(layers)])
            ax.set(ylabel=label)
        axes[0].set_title("Router-expert coupling after training")
        axes[1].set_title("Router specialisation (eps)")
        axes[0].legend(fontsize=7)
        save(fig, "posthoc_erc_and_eps.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    for method, runs in results.items():
        steps = [s for s, _ in runs[0]["maxvio_curve"]]
        if steps:
            mean = [_mean_std(r["maxvio_curve"][i][1] for r in runs if i < len(r["maxvio_curve"]))[0]
                    for i in range(len(steps))]
            ax.plot(steps, mean, color=COLORS[method], label=METHODS[method][0])
    ax.set(xlabel="training step", ylabel="MaxVio of the batch ((max - mean) / mean load)",
           title="Load balance during training (mean over seeds and layers)")
    ax.legend(fontsize=7)
    save(fig, "maxvio.png")

    fig, ax = plt.subplots(figsize=(7, 3.5))
    methods = list(results)
    ax.bar(range(len(methods)), [results[m][0]["flops_per_token"] / 1e6 for m in methods],
           color=[COLORS[m] for m in methods])
    ax.set_xticks(range(len(methods)), [METHODS[m][0] for m in methods], rotation=30, ha="right", fontsize=7)
    ax.set(ylabel="training MFLOP per token (analytic)", title="Cost per token (moe_erc/model/flops.py)")
    save(fig, "flops_per_token.png")

    for method in ("vanilla", "erc-1", "symmetric-erc-1"):  # the last: ERC under the centred router rule
        if method in results and "M" in results[method][0]:
            matrices = results[method][0]["M"]
            fig, axes = plt.subplots(1, len(matrices), figsize=(3 * len(matrices), 3))
            for k, (ax, M) in enumerate(zip(list(axes) if len(matrices) > 1 else [axes], matrices)):
                image = ax.imshow(M, cmap="viridis")
                ax.set(title=f"layer {k + 1}", xlabel="expert j", ylabel="proxy of expert i")
                fig.colorbar(image, ax=ax, fraction=0.046)
            fig.suptitle(f"M[i, j] = ||Wg_j R_i||, {METHODS[method][0]}, first seed")
            save(fig, f"M_{method}.png")
    return names


def write_report(results, config: str, extra: list[str], seeds: list[int], out: Path, command: str) -> Path:
    from moe_erc.config import load_config

    out.mkdir(parents=True, exist_ok=True)
    names = figures(results, out)
    cfg = load_config(config, extra)
    m, moe, t = cfg.model, cfg.moe, cfg.training
    lines = [
        "# Optimizer ablation: the authors' stack, and where Muon's anti-coupling comes from" if "paper" in results
        else "# Optimizer comparison: AdamW, Muon, symmetric" if "symmetric" in results else (
            "# K-Means ablation and router geometry" if "kmeans-running" in results else "# The small-scale study"), "",
        f"Command: `{command}`  ",
        f"Machine: {platform.machine()}, {platform.processor() or 'CPU'}, Python {platform.python_version()}; "
        f"written {time.strftime('%Y-%m-%d %H:%M')}  ",
        f"Model ({config}{' + ' + ' '.join(extra) if extra else ''}): {m.num_layers} layers, d={m.hidden_size}, "
        f"{moe.num_experts} experts top-{moe.moe_router_topk} (width {moe.moe_ffn_hidden_size}), seq {m.seq_length}; "
        f"{t.train_iters} steps x {t.global_batch_size * m.seq_length} tokens; seeds {', '.join(map(str, seeds))} "
        f"(the seed sets initial weights and data order; every method sees the same data for a seed).", "",
        "## Per method (mean ± std over seeds)", "",
        "| method | validation loss | post-hoc ERC loss, alpha=0.5 / 1 / 2 (mean over layers) | eps | MaxVio (valid) "
        "| dead experts (all layers, per log window) | coupling | top-K overlap | tokens/s | MFLOP/token |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, runs in results.items():
        if "posthoc" in runs[0]:
            posthoc = " / ".join(_fmt(_mean_std(statistics.mean(r["posthoc"][a]) for r in runs), 4) for a in ALPHAS)
            eps = _fmt(_mean_std(statistics.mean(r["eps"]) for r in runs), 3)
        else:
            posthoc, eps = "n/a (no router matrix)", "n/a"
        lines.append(
            f"| {METHODS[method][0]} | {_fmt(_mean_std(r['valid_loss'] for r in runs))} | {posthoc} | {eps} | "
            f"{_fmt(_mean_std(r['maxvio_valid'] for r in runs), 3)} | {_fmt(_mean_std(r['dead_experts'] for r in runs), 2)} | "
            f"{_fmt(_mean_std(r['coupling'] for r in runs), 3)} | {_fmt(_mean_std(r['coupling_topk'] for r in runs), 3)} | "
            f"{_mean_std(r['tokens_per_s'] for r in runs)[0]:,.0f} | {runs[0]['flops_per_token'] / 1e6:.2f} |")
    lines += ["", "Post-hoc ERC loss and eps per layer (alpha=1, clean router rows, as `moe-erc analyze` computes them):",
              "", "| method | " + " | ".join(f"layer {k + 1} ERC / eps" for k in range(m.num_layers)) + " |",
              "|---|" + "---|" * m.num_layers]
    for method, runs in results.items():
        if "posthoc" in runs[0]:
            cells = [f"{_mean_std(r['posthoc'][1.0][k] for r in runs)[0]:.4f} / "
                     f"{_mean_std(r['eps'][k] for r in runs)[0]:.3f}" for k in range(len(runs[0]['eps']))]
            lines.append(f"| {METHODS[method][0]} | " + " | ".join(cells) + " |")
    if any(m in results for m in KMEANS_VARIANTS[1:]):
        lines += ["", "## K-Means ablation (seed-paired against aux-loss and aux-loss-free balancing)", "",
                  *kmeans_rows(results)]
    if any(m in results for m in ("muon", "muon-erc-1", "symmetric", "symmetric-erc-1")):
        lines += ["", "## Optimizers (docs/optimizers.md): AdamW vs Muon vs the symmetric stack", "",
                  *optimizer_rows(results)]
    lines += ["", "## The paper's claims at this scale", ""]
    muon = results.get("muon")
    muon_coupling = statistics.mean(r["coupling"] for r in muon) if muon else None
    for claim, verdict, evidence in (claims(results) + optimizer_claims(results) + kmeans_claims(results)
                                     + ablation_claims(results, muon_coupling)):
        lines.append(f"- **{claim}: {verdict}.** {evidence}")
    lines += ["", "## Figures", ""] + [f"![{name}]({name})" for name in names] + [""]
    path = out / "README.md"
    path.write_text("\n".join(lines))
    return path


# ---------------------------------------------------------------------------------------------- command


RUNS_DEFAULT = "runs/study"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="moe-erc study", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/study.yaml")
    parser.add_argument("--quick", action="store_true", help="one seed, 60 steps: a smoke run")
    parser.add_argument("--methods", default=None,
                        help=f"comma list of: {', '.join(METHODS)} (default: the routing methods)")
    parser.add_argument("--optimizers", action="store_true",
                        help="compare AdamW, Muon and the symmetric stack with vanilla and ERC routing "
                             "(methods " + ",".join(OPTIMIZER_METHODS) + "; default --out docs/optimizers)")
    parser.add_argument("--kmeans-ablation", action="store_true",
                        help="the K-Means router's options against aux-loss and aux-loss-free balancing, and no "
                             "balancing (methods " + ",".join(KMEANS_METHODS) + "; default --out docs/study/kmeans)")
    parser.add_argument("--optimizer-ablation", action="store_true",
                        help="Lau & Su's OLMoE stack against their AdamW control, and Muon on one component at a time "
                             "(methods " + ",".join(ABLATION_METHODS) + f"; {', '.join(ANTI_COUPLING)} on the first "
                             "seed only; default --out docs/optimizers/ablation)")
    parser.add_argument("--seeds", default=None, help="comma list (default: 3 seeds; --quick: 1)")
    parser.add_argument("--runs", default=RUNS_DEFAULT, help="where the runs go (resumable; --quick: runs/study-quick)")
    parser.add_argument("--out", default=None, help="where README.md and the figures go (default docs/study; "
                                                   "--quick: <runs>/report)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs trained at once, each with cpu_count/jobs threads (2 on a 2-core CPU: ~1.7x faster)")
    parser.add_argument("--set", nargs="*", default=[], metavar="section.key=value",
                        help="config overrides for every run (e.g. a smaller model)")
    args = parser.parse_args(argv)
    from moe_erc.errors import ConfigError

    default = (OPTIMIZER_METHODS if args.optimizers else KMEANS_METHODS if args.kmeans_ablation else
               ABLATION_METHODS if args.optimizer_ablation else ROUTING_METHODS)
    if args.jobs < 1:
        raise ConfigError(f"--jobs {args.jobs} must be at least 1")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods is not None else default
    if not methods:
        raise ConfigError(f"--methods '{args.methods}' names no method; choose from {', '.join(METHODS)}")
    if args.quick:  # a smoke run: its own runs (60-step schedules a full study must not resume) and report
        args.runs = args.runs if args.runs != RUNS_DEFAULT else RUNS_DEFAULT + "-quick"
        args.out = args.out or str(Path(args.runs) / "report")
    args.out = args.out or ("docs/optimizers" if args.optimizers else
                            "docs/study/kmeans" if args.kmeans_ablation else
                            "docs/optimizers/ablation" if args.optimizer_ablation else "docs/study")
    check_output_dir(args.out)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown study method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()] if args.seeds is not None else \
            list(SEEDS[:1] if args.quick else SEEDS)
    except ValueError:
        seeds = []
    if not seeds:
        raise ConfigError(f"--seeds '{args.seeds}' must be comma-separated integers, e.g. 1234,2345")
    extra = [*(QUICK if args.quick else []), *args.set]
    seeds_for = {m: seeds[:1] for m in ANTI_COUPLING} if args.optimizer_ablation else {}
    runs = run_all(args.config, methods, seeds, Path(args.runs), extra, jobs=args.jobs, seeds_for=seeds_for)
    results = {m: [measure(args.config, m, runs[(m, s)], extra) for s in seeds_for.get(m, seeds)] for m in methods}
    command = "moe-erc study " + " ".join(argv if argv is not None else sys.argv[2:])
    path = write_report(results, args.config, extra, seeds, Path(args.out), command.strip())
    print(f"study: wrote {path} and {len(list(Path(args.out).glob('*.png')))} figures")
    return 0
