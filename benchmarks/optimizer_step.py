"""Optimizer cost on this machine: AdamW vs Muon vs the symmetric stack, side by side in one process.

    python benchmarks/optimizer_step.py                        # configs/study.yaml shapes, 10 interleaved repeats
    python benchmarks/optimizer_step.py --config configs/tiny.yaml --repeats 20 --set moe.moe_grouped_gemm=true

One model per optimizer (same initial weights), megatron DDP + the optimizer, synthetic batches; the three
take turns step by step so machine noise hits them alike. Prints a Markdown table: median seconds of the
whole training step and of ``optimizer.step()`` alone, and their ratios to AdamW. Asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from moe_erc.config import load_config  # noqa: E402

OPTIMIZERS = ("adamw", "muon", "symmetric")


def build(config: str, overrides: list[str]):
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from moe_erc.model import gpt as model_lib

    from moe_erc.training import parallel
    from moe_erc.compat import prepare_runtime
    from moe_erc.training.optimizer import build_optimizer, describe, wrap_ddp

    device = prepare_runtime("cpu")
    base = load_config(config, overrides)
    parallel.initialize(base, device)
    runs = {}
    for name in OPTIMIZERS:
        cfg = load_config(config, [*overrides, f"optimizer.name={name}"])
        parallel.set_seed(cfg.training.seed)
        tf = model_lib.transformer_config(cfg)
        tf.finalize_model_grads_func = finalize_model_grads
        ddp = wrap_ddp(cfg, tf, model_lib.build_model(cfg, tf, vocab_size=8192))
        opt = build_optimizer(cfg, tf, [ddp])
        runs[name] = (ddp, opt, describe(cfg, [ddp], "AdamW"))
    return base, runs, get_forward_backward_func()


def step(cfg, ddp, opt, fwd_bwd) -> tuple[float, float]:
    """(whole step, optimizer.step()) in seconds for one synthetic micro-batch."""
    b, seq = cfg.training.micro_batch_size, cfg.model.seq_length
    tokens = torch.randint(0, 8000, (b, seq))
    labels, positions = torch.roll(tokens, -1, 1), torch.arange(seq).expand(b, seq)

    def forward_step(_iterator, model):
        out = model(tokens, positions, None, labels=labels)
        return out, lambda o: (o.float().mean(), {"lm loss": o.float().mean().detach()})

    start = time.perf_counter()
    ddp.zero_grad_buffer()
    opt.zero_grad()
    fwd_bwd(forward_step_func=forward_step, data_iterator=iter([None]), model=[ddp], num_microbatches=1,
            seq_length=seq, micro_batch_size=b, forward_only=False)
    mid = time.perf_counter()
    opt.step()
    end = time.perf_counter()
    return end - start, end - mid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "study.yaml"))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--set", nargs="*", default=[], metavar="section.key=value")
    args = parser.parse_args()
    cfg, runs, fwd_bwd = build(args.config, args.set)
    times = {name: [] for name in OPTIMIZERS}
    for name in OPTIMIZERS:  # warm-up: first steps allocate state
        step(cfg, *runs[name][:2], fwd_bwd)
    for _ in range(args.repeats):
        for name in OPTIMIZERS:
            times[name].append(step(cfg, *runs[name][:2], fwd_bwd))
    med = {n: (statistics.median(t[0] for t in times[n]), statistics.median(t[1] for t in times[n])) for n in times}
    print(f"\n## Optimizer cost ({Path(args.config).name} {' '.join(args.set)}; {torch.get_num_threads()} threads, "
          f"{args.repeats} interleaved repeats, medians)\n")
    print("| optimizer | step (s) | optimizer.step() (s) | step vs AdamW | optimizer.step() vs AdamW | rules |")
    print("|---|---|---|---|---|---|")
    for name in OPTIMIZERS:
        whole, opt = med[name]
        print(f"| {name} | {whole:.3f} | {opt:.3f} | {whole / med['adamw'][0]:.2f}x | {opt / med['adamw'][1]:.2f}x "
              f"| {runs[name][2]} |")


if __name__ == "__main__":
    main()
