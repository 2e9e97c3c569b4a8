"""`moe-erc study`'s report: seed pairing and verdicts (the command end to end: tests/test_readme.py)."""


def _run(loss, erc_max=0.0, eps=0.5):
    return {"valid_loss": loss, "maxvio_valid": 0.3, "eps": [eps, eps], "posthoc": {1.0: [erc_max / 2, erc_max]},
            "tokens_per_s": 1000.0}


def test_optimizer_report_pairs_seeds_and_judges_claims_e_and_f():
    """Synthetic run results with known differences: the table's seed-paired deltas and the verdicts follow."""
    from moe_erc.study import optimizer_claims, optimizer_rows

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
