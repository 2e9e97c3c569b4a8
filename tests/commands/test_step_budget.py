"""The step budget: host syncs and kernel launches of one training step, counted on CPU.

Budgets (a change that breaks one fails here with the whole table):

* host syncs per step at EP = 1: 1, the trainer's one read (loss, finite flag, stop flag); at EP > 1 also
  one per MoE layer per micro-batch (the all-to-all split sizes a variable-size all-to-all needs on the host);
* MoE block (router + dispatch + experts + instruments, forward + backward) <= 120 launches per MoE layer per
  micro-batch with grouped experts, for every router (measured 92-114 at the scaled-down 3B shapes); <= 150 for
  the DeepSeek-style variant (measured 142: group-limited top-K, routed scaling and the sequence-wise aux loss
  add router work, the shared expert its MLP);
* ERC <= 100 launches per MoE layer per step (measured 87).

Shapes: :func:`moe_erc.commands.budget.budget_overrides` (4 layers, d=256, 64 experts top-8, expert width 128, seq 256,
bf16, 2 micro-batches), on a step that neither logs, evaluates nor saves.
"""

import pytest
import torch

from moe_erc.commands import budget
from moe_erc.config import load_config

SYNCS_EP1 = 1  # trainer._read_step: one transfer per step
MOE_BLOCK_PER_LAYER_MICROBATCH = 120
MOE_BLOCK_DEEPSEEK = 150  # MLA, shared expert, group-limited sigmoid routing, MTP (budget.VARIANTS["deepseek"])
ERC_PER_LAYER = 100

COUNTED = [("vanilla", "adamw"), ("erc", "adamw"), ("aoe", "adamw"), ("kmeans", "adamw"), ("auxfree", "adamw"),
           ("erc", "symmetric"), ("deepseek", "adamw")]  # (every router x symmetric: benchmarks/step_budget.py --optimizer symmetric)


@pytest.fixture(scope="module")
def counts(tiny_corpus, tmp_path_factory):
    """Every variant counted once, in this process (one warm-up step each: the optimizer state exists)."""
    out = {}
    for variant, optimizer in COUNTED:
        run_dir = tmp_path_factory.mktemp(f"budget-{variant}-{optimizer}")
        cfg = load_config(None, budget.budget_overrides(str(run_dir), tiny_corpus)
                          + budget.VARIANTS[variant] + [f"optimizer.name={optimizer}"])
        out[(variant, optimizer)] = budget.count_step(cfg, warmup=1, label=f"{variant}/{optimizer}")
    return out


def _table(counts) -> str:
    return "\n" + budget.format_table(list(counts.values()))


@pytest.mark.parametrize("variant, optimizer", COUNTED)
def test_one_host_sync_per_step_at_ep1(counts, variant, optimizer):
    count = counts[(variant, optimizer)]
    assert len(count.sync_points) <= SYNCS_EP1 and len(count.reads) <= SYNCS_EP1, _table(counts)
    assert count.reads and "trainer.py" in count.reads[0][1] and "_read_step" in count.reads[0][1], _table(counts)


@pytest.mark.parametrize("variant, optimizer", COUNTED)
def test_moe_block_and_erc_launch_budgets(counts, variant, optimizer):
    count = counts[(variant, optimizer)]
    limit = MOE_BLOCK_DEEPSEEK if variant == "deepseek" else MOE_BLOCK_PER_LAYER_MICROBATCH
    assert count.moe_block_per_layer_mb() <= limit, _table(counts)
    assert count.erc_per_layer() <= ERC_PER_LAYER, _table(counts)
    # The parts are seen at all: a counter that attributes nothing would pass the budgets above.
    assert count.part_total("experts") > 0 and count.part_total("router") > 0, _table(counts)
    assert count.part_total("dispatch") > 0 and count.phase_total("backward") > 0, _table(counts)
    assert (count.part_total("erc") > 0) == (variant in ("erc", "deepseek")), _table(counts)


def test_ep2_keeps_one_sync_per_layer_and_micro_batch(tiny_corpus, tmp_path):
    from launch import run_worker

    rows = run_worker("step_budget_ep.py", tiny_corpus, str(tmp_path / "run"), nproc=2)
    assert len(rows) == 2
    for row in rows:
        allowed = SYNCS_EP1 + row["moe_layers"] * row["micro_batches"]
        assert row["host_syncs"] <= allowed, row
        assert row["host_syncs"] >= row["moe_layers"] * row["micro_batches"], row  # the split sizes are read
        assert any("token_dispatcher" in site for site in row["sync_sites"]), row


# ---------------------------------------------------------------------------------------- the counter itself


def test_the_counter_sees_reads_and_tells_host_tensors_apart():
    device_values = torch.randn(4)
    host_step = torch.tensor(3.0)

    def step():
        y = device_values * 2
        y.sum().item()                      # a read (sync point: work was queued)
        y.max().item()                      # a read after more work: a second sync point
        y.tolist()                          # back-to-back with the read before: a read, not a sync point
        torch.tensor([y[0], y[1]])          # two reads of device tensors (one copy each)
        (host_step + 1).item()              # host-resident: free
        torch.zeros(3).tolist()             # made without a device: host-resident too
        device_values.nonzero()             # data-dependent shape: a read

    count = budget.count_calls(step, host=[host_step])
    kinds = [kind for kind, _ in count.reads]
    assert kinds == ["item", "item", "tolist", *["torch.tensor(device tensors)"] * 2, "nonzero"], count.reads
    # tolist and torch.tensor follow reads with no launch between (y[0] is a view): the queue is already empty
    assert [kind for kind, _ in count.sync_points] == ["item", "item", "nonzero"], count.sync_points
    assert all("test_step_budget.py" in site for _, site in count.reads)
    assert count.total_launches >= 5  # mul, sum, max, nonzero, index/stack ...
