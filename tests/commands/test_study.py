"""`moe-erc study`'s report: seed pairing and verdicts (the command end to end: tests/test_readme.py)."""


def _run(loss, erc_max=0.0, eps=0.5):
    return {"valid_loss": loss, "maxvio_valid": 0.3, "eps": [eps, eps], "posthoc": {1.0: [erc_max / 2, erc_max]},
            "tokens_per_s": 1000.0}


def test_optimizer_report_pairs_seeds_and_judges_claims_e_and_f():
    """Synthetic run results with known differences: the table's seed-paired deltas and the verdicts follow."""
    from moe_erc.commands.study import optimizer_claims, optimizer_rows

    results = {
        "vanilla": [_run(4.30, 0.02), _run(4.40, 0.03), _run(4.50, 0.02)],
        "erc-1": [_run(4.31), _run(4.41), _run(4.52)],
        "muon": [_run(4.10), _run(4.25), _run(4.30)],
        "symmetric": [_run(4.00), _run(4.11), _run(4.19)],       # - AdamW: -0.30, -0.29, -0.31
        "symmetric-erc-1": [_run(4.40, 0.01), _run(4.40, 0.01), _run(4.62, 0.01)],  # - AdamW: +0.09, -0.01, +0.10
    }
    rows = "\n".join(optimizer_rows(results))
    assert "| symmetric | vanilla | 4.1000 ± 0.0954 | -0.3000 ± 0.0100 |" in rows, rows
    assert "| AdamW | ERC alpha=1 | 4.4133 ± 0.1050 | — |" in rows, rows
    assert "Seed-paired symmetric − Muon (vanilla routing): -0.1167 ± 0.0208 over 3 seed(s)." in rows, rows
    assert "muon-erc-1" not in rows and "Muon | ERC" not in rows  # no runs, no row
    verdicts = {claim: verdict for claim, verdict, _ in optimizer_claims(results)}
    assert verdicts == {
        "(e) the symmetric stack reaches a lower validation loss than AdamW (vanilla routing)": "reproduced",
        "(e) the symmetric stack reaches a lower validation loss than AdamW (ERC alpha=1 routing)": "inconclusive",
        "(f) ERC still meets its constraint when the router update ignores the row mean (centered row-norm)":
            "not reproduced",  # post-hoc ERC 0.01 >= 1e-3
    }
    results["symmetric-erc-1"] = [_run(4.50), _run(4.60), _run(4.70)]  # + 0.19 ± 0.01 above AdamW, ERC met
    verdicts = [verdict for _, verdict, _ in optimizer_claims(results)]
    assert verdicts == ["reproduced", "not reproduced", "reproduced"]


def _km(loss, maxvio, cosine=0.1):
    return {**_run(loss), "maxvio_valid": maxvio, "router_cosine": cosine, "dead_experts": 0.0, "coupling": 0.5}


def test_kmeans_ablation_pairs_seeds_against_both_balancers_and_judges_claims_g_and_h():
    """Synthetic results: a variant below both balancers' MaxVio by far more than its spread with a small loss
    increase is reproduced; one above aux-loss-free is not; the geometry ratio is taken seed by seed."""
    from moe_erc.commands.study import kmeans_claims, kmeans_rows

    results = {
        "vanilla": [_km(4.30, 0.30, 0.30), _km(4.40, 0.32, 0.33), _km(4.50, 0.31, 0.36)],
        "auxfree": [_km(4.31, 0.13, 0.20), _km(4.41, 0.12, 0.22), _km(4.52, 0.14, 0.24)],
        "noaux": [_km(4.29, 0.90, 0.10), _km(4.41, 0.95, 0.11), _km(4.49, 0.92, 0.12)],
        "kmeans": [_km(4.33, 0.93, None), _km(4.43, 0.91, None), _km(4.52, 0.95, None)],      # the docs/study case
        "kmeans-running": [_km(4.32, 0.05, None), _km(4.42, 0.06, None), _km(4.53, 0.05, None)],
    }
    rows = "\n".join(kmeans_rows(results))
    # by hand: MaxVio - aux loss = -0.25, -0.26, -0.26; - aux-loss-free = -0.08, -0.06, -0.09; loss +0.02, +0.02, +0.03
    assert "| K-Means, running mean | 0.053 ± 0.006 | -0.257 ± 0.006 | -0.077 ± 0.015 | 0.0233 ± 0.0058 |" in rows, rows
    assert "seeds from 16" not in rows  # no runs, no row
    verdicts = {claim: verdict for claim, verdict, _ in kmeans_claims(results)}
    assert verdicts == {
        "(g) K-Means has the lowest load imbalance, with a modest perplexity increase": "not reproduced",
        "(g) K-Means, running mean has the lowest load imbalance, with a modest perplexity increase": "reproduced",
        "(h) the auxiliary load-balancing loss makes router rows more similar (paper: nearly 3x)": "reproduced",
    }
    evidence = {claim: text for claim, _, text in kmeans_claims(results)}
    assert "aux loss 0.01 / none: 3.00 ± 0.00 over 3 seed(s); aux-loss-free / none 2.00 ± 0.00" in \
        evidence["(h) the auxiliary load-balancing loss makes router rows more similar (paper: nearly 3x)"]
    results["kmeans-running"][0]["valid_loss"] = 4.40
    results["kmeans-running"][1]["valid_loss"] = 4.60  # loss increase +0.10, +0.20, +0.03: 0.11 > 0.05, not modest
    verdicts = {claim: verdict for claim, verdict, _ in kmeans_claims(results)}
    assert verdicts["(g) K-Means, running mean has the lowest load imbalance, with a modest perplexity increase"] == \
        "inconclusive"


def test_run_all_trains_jobs_at_once_with_split_threads_and_own_index_caches(tmp_path, monkeypatch):
    """--jobs 2: every unfinished run is launched once, each with cpu_count/2 threads and its own sample-index
    cache; a failed run is named in one error after the others finished."""
    import subprocess
    import threading
    import types

    import pytest

    from moe_erc.commands import study
    from moe_erc.errors import UserError

    calls, running, peak, lock = [], [0], [0], threading.Lock()

    def fake_run(cmd, env=None, **_):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        import time

        time.sleep(0.2)
        with lock:
            running[0] -= 1
            calls.append((cmd, env))
        failed = "training.seed=2" in cmd and "moe.router=kmeans" in cmd
        return subprocess.CompletedProcess(cmd, 1 if failed else 0, "", "boom\nlast line" if failed else "")

    monkeypatch.setattr(study, "subprocess", types.SimpleNamespace(run=fake_run))
    monkeypatch.setattr(study.os, "cpu_count", lambda: 4)
    with pytest.raises(UserError, match=r"kmeans-s2 failed \(\['last line'\]\)"):
        study.run_all("configs/study.yaml", ["vanilla", "kmeans"], [1, 2], tmp_path, [], say=lambda _: None, jobs=2)
    assert len(calls) == 4 and peak[0] == 2
    assert {env["OMP_NUM_THREADS"] for _, env in calls} == {"2"}
    caches = {next(a for a in cmd if a.startswith("data.cache_dir=")) for cmd, _ in calls}
    assert caches == {f"data.cache_dir={tmp_path / r / 'index-cache'}"
                      for r in ("vanilla-s1", "vanilla-s2", "kmeans-s1", "kmeans-s2")}


def test_optimizer_ablation_judges_the_preset_gap_and_where_the_anti_coupling_lives():
    """Synthetic results, verdicts by hand: (i) control - preset per seed; (j) Muon on experts vs router only;
    (k) Muon without the aux loss."""
    from moe_erc.commands.study import ablation_claims

    def run(loss, coupling=0.1):
        return {"valid_loss": loss, "coupling": coupling}

    results = {"paper": [run(4.00), run(4.10), run(4.20)], "paper-control": [run(4.03), run(4.12), run(4.24)],
               "muon-experts": [run(4.1, -0.30)], "muon-router": [run(4.2, 0.12)], "muon-aux0": [run(4.1, -0.35)]}
    claims = {c[:3]: (v, e) for c, v, e in ablation_claims(results, muon_coupling=-0.36)}
    # control - preset = +0.03, +0.02, +0.04: mean 0.03, std 0.01 -> 0.03 > 0.02: reproduced
    assert claims["(i)"][0] == "reproduced" and "+0.0300 ± 0.0100 over 3 seed(s)" in claims["(i)"][1]
    assert claims["(j)"][0] == "supported" and "experts only -0.300, on the router only +0.120" in claims["(j)"][1]
    assert "Muon everywhere -0.360" in claims["(j)"][1]
    assert claims["(k)"][0] == "reproduced"
    results["muon-router"] = [run(4.2, -0.25)]  # both negative: cannot pin it on the experts
    results["muon-aux0"] = [run(4.1, 0.02)]
    results["paper-control"] = [run(3.98), run(4.07), run(4.19)]  # control better by 0.02, 0.03, 0.01
    claims = {c[:3]: v for c, v, _ in ablation_claims(results)}
    assert claims == {"(i)": "not reproduced", "(j)": "inconclusive", "(k)": "not reproduced"}
    results["muon-experts"] = [run(4.1, 0.05)]
    assert {c[:3]: v for c, v, _ in ablation_claims(results)}["(j)"] == "refuted"


def test_every_method_has_a_colour_and_valid_overrides():
    """Each study method's figure colour exists and its overrides make a valid config of configs/study.yaml."""
    from moe_erc.config import load_config
    from moe_erc.commands.study import COLORS, METHODS

    assert set(METHODS) <= set(COLORS)
    for name, (_label, overrides) in METHODS.items():
        load_config("configs/study.yaml", overrides)
