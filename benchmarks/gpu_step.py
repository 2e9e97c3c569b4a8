"""Step performance in one run, one table: what the performance targets (docs/performance.md) are checked against.

    python benchmarks/gpu_step.py                       # GPU: the paper's 3B shapes (12 layers, seq 4096)
    python benchmarks/gpu_step.py --layers 6 --micro-batches 16
    python benchmarks/gpu_step.py --preset cpu          # a small model on CPU (CI runs it: tests/test_benchmarks.py)

Rows (all measured side by side in this process; medians of repeats after warm-up):

1. step      tokens/s, MFU (model FLOPs / step time / the GPU's dense bf16 peak), peak memory
2. erc       step time with ERC on / off in the same model (ERC toggled per step, interleaved), at
             ``--erc-micro-batches`` micro-batches (default: 98k tokens, the paper's load per GPU at dp=32)
3. kernel    ERC forward+backward of one layer vs the GEMM floor (one ``[n,d] x [d,n*D]`` GEMM, fp32 norms,
             its two backward GEMMs), at the 3B (n=64, D=768) and 15B (n=256, D=512) shapes
4. experts   GroupedExperts (torch._grouped_mm) vs megatron's per-expert SequentialMLP, forward+backward
             of one layer's experts at ``--expert-tokens`` tokens

GPU time is often short (a shared or lent machine: ``scripts/test.sh --gpu`` and this script together in
about 8 minutes), so the run keeps to ``--time-budget`` (default 150 s on a GPU, model build included): rows 3 and 4 run
first (seconds), then two warm-up steps time one step and rows 1 and 2 get as many repeats as fit (at most
``--repeats``, 3 for the 3B preset); a row that cannot run once is printed as skipped, with the step time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

PRESETS = {
    # The paper's 3B model (SPEC §4); vocabulary assumed 50304.
    "3b": dict(overrides=["model.num_layers=12", "model.hidden_size=1536", "model.num_attention_heads=16",
                          "model.seq_length=4096", "moe.num_experts=64", "moe.moe_router_topk=8",
                          "moe.moe_ffn_hidden_size=768", "model.ffn_hidden_size=6144"],
               vocab=50304, micro_batch=2, micro_batches=8, erc_micro_batches=12, expert_tokens=16384,
               kernel_shapes=[(64, 1536, 768), (256, 1536, 512)], repeats=3),
    # Small enough for 2 CPU cores in seconds: exercises every row.
    "cpu": dict(overrides=["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
                           "model.seq_length=64", "moe.num_experts=8", "moe.moe_router_topk=2",
                           "moe.moe_ffn_hidden_size=64", "model.ffn_hidden_size=128"],
                vocab=512, micro_batch=2, micro_batches=2, erc_micro_batches=2, expert_tokens=512,
                kernel_shapes=[(16, 64, 32)], repeats=3),
}

# Dense bf16 tensor-core peak (FLOP/s) by device name; MFU is left out for others.
BF16_PEAK = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12,
             "B200": 2250e12, "L40S": 362e12}


def gpu_peak() -> tuple[str, float | None]:
    if not torch.cuda.is_available():
        return "cpu", None
    name = torch.cuda.get_device_name()
    for key in sorted(BF16_PEAK, key=len, reverse=True):
        if key in name:
            return name, BF16_PEAK[key]
    return name, None


class Timer:
    """Wall time of a callable, synchronising the GPU before and after."""

    def __init__(self, device: str):
        self.sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def __call__(self, fn) -> float:
        self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - start


# ------------------------------------------------------------------------------------------ 1, 2


class Model:
    """One ERC model (megatron DDP + optimizer) on this process's device, with synthetic batches."""

    def __init__(self, cfg, device: str, vocab: int):
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from moe_erc.model import gpt as model_lib
        from moe_erc.model.layers.kernels import detect
        from moe_erc.training.optimizer import build_optimizer, wrap_ddp

        precision = model_lib.resolve_precision(cfg, device)
        self.kernels = detect(device, cfg.training.fused_kernels)
        self.tf = model_lib.transformer_config(cfg, precision, self.kernels)
        self.vocab = model_lib.padded_vocab_size(vocab, cfg)
        net = model_lib.build_model(cfg, self.tf, self.vocab)
        if cfg.training.compile:
            model_lib.compile_layers(net)
        self.ddp = wrap_ddp(cfg, self.tf, net)
        self.opt = build_optimizer(cfg, self.tf, [self.ddp])
        self.tf.finalize_model_grads_func = finalize_model_grads
        self.fwd_bwd = get_forward_backward_func()
        self.cfg, self.device, self.precision, self.step_index = cfg, device, precision, 0
        self.routers = [m.router for m in net.modules() if hasattr(getattr(m, "router", None), "erc_config")]

    def step(self, micro_batch: int, micro_batches: int, erc: bool = True) -> None:
        from moe_erc.model.layers.erc_layer import set_training_step

        seq, device = self.cfg.model.seq_length, self.device
        tokens = torch.randint(0, self.vocab, (micro_batches, micro_batch, seq), device=device)
        positions = torch.arange(seq, device=device).expand(micro_batch, seq)
        batches = iter(range(micro_batches))

        def forward_step(_iterator, model):
            i = next(batches)
            out = model(tokens[i], positions, None, labels=tokens[i].roll(-1, 1))
            return out, lambda o: (o.float().mean(), {"lm loss": o.float().mean().detach()})

        saved = [router._experts_ref for router in self.routers]
        if not erc:  # ERC off in the same model: the router finds no experts to couple with
            for router in self.routers:
                router._experts_ref = ()
        try:
            self.step_index += 1
            set_training_step(self.step_index)
            self.ddp.zero_grad_buffer()
            self.opt.zero_grad()
            self.fwd_bwd(forward_step_func=forward_step, data_iterator=iter([None]), model=[self.ddp],
                         num_microbatches=micro_batches, seq_length=seq, micro_batch_size=micro_batch,
                         forward_only=False)
            self.opt.step()
        finally:
            for router, ref in zip(self.routers, saved):
                router._experts_ref = ref


class Deadline:
    """The wall-clock budget of the whole benchmark (GPU time is short: it must end when it says it will)."""

    def __init__(self, seconds: float):
        self.seconds, self.end = seconds, time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def fits(self, cost: float, wanted: int) -> int:
        """How many repeats of something costing ``cost`` s fit in what is left (at most ``wanted``)."""
        if self.seconds == float("inf"):
            return wanted
        return max(0, min(wanted, int(self.left() // max(cost, 1e-9))))


def bench_steps(model: Model, preset: dict, timer: Timer, repeats: int, deadline: Deadline) -> list[list]:
    """Rows 1 and 2. Repeats shrink to what the deadline leaves after two warm-up steps (the second one's
    time is the estimate); a row that cannot fit once says so instead of running past the budget."""
    from moe_erc.model.flops import step_flops

    mbs, nmb, ercmb = preset["micro_batch"], preset["micro_batches"], preset["erc_micro_batches"]
    seq = model.cfg.model.seq_length
    warm = [timer(lambda: model.step(mbs, nmb)) for _ in range(2)]  # kernels selected, allocator grown, compiled
    estimate = warm[-1]
    # ERC on/off pairs cost (1 + 1) * ercmb / nmb steps each; split what is left between the two rows.
    pair_cost = 2 * estimate * ercmb / nmb
    n_steps = deadline.fits(estimate, repeats) if deadline.left() > estimate + pair_cost else \
        deadline.fits(estimate, 1)
    print(f"# step {estimate:.2f} s (warm-up {warm[0]:.1f} s); {deadline.left():.0f} s left of "
          f"{deadline.seconds:.0f}: {n_steps} timed steps, then ERC on/off pairs of {pair_cost:.1f} s", flush=True)
    if n_steps == 0:
        return [["tokens/s", "skipped", f"one step takes {estimate:.1f} s, {deadline.left():.0f} s left "
                                        f"(--time-budget, --layers, --micro-batches)"]]
    if model.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = [timer(lambda: model.step(mbs, nmb)) for _ in range(n_steps)]
    step_time = statistics.median(times)
    tokens = mbs * nmb * seq
    flops_cfg = model.cfg.model_copy(update={"training": model.cfg.training.model_copy(
        update={"global_batch_size": mbs * nmb})})
    flops = step_flops(flops_cfg, 1, model.vocab).model_per_gpu
    name, peak = gpu_peak()
    memory = torch.cuda.max_memory_allocated() / 2**30 if model.device == "cuda" else float("nan")
    rows = [["tokens/s", f"{tokens / step_time:,.0f}",
                                     f"{tokens} tokens/step, step {step_time * 1e3:.0f} ms (median of {n_steps})"],
            ["MFU", f"{100 * flops / step_time / peak:.1f} %" if peak else "n/a",
             f"{flops / step_time / 1e12:.1f} TFLOP/s model FLOPs on {name}"],
            ["peak memory", f"{memory:.1f} GiB" if memory == memory else "n/a", model.precision]]
    pairs = deadline.fits(pair_cost, repeats)
    if pairs == 0:
        rows.append(["ERC on/off step time", "skipped", f"a pair of {mbs * ercmb * seq}-token steps takes "
                                                        f"~{pair_cost:.0f} s, {deadline.left():.0f} s left"])
        return rows
    on, off = [], []
    for _ in range(pairs):  # interleaved: the machine's drift hits both alike
        off.append(timer(lambda: model.step(mbs, ercmb, erc=False)))
        on.append(timer(lambda: model.step(mbs, ercmb, erc=True)))
    ratio = statistics.median(on) / statistics.median(off)
    rows.append(["ERC on/off step time", f"{ratio:.4f}",
                 f"{mbs * ercmb * seq} tokens/step: {statistics.median(on) * 1e3:.0f} vs "
                 f"{statistics.median(off) * 1e3:.0f} ms, {pairs} interleaved pairs"])
    return rows


# ------------------------------------------------------------------------------------------ 3


def bench_erc_kernel(shapes, device: str, dtype, timer: Timer, repeats: int) -> list[list]:
    from moe_erc.model import erc

    rows = []
    for n, d, D in shapes:
        g = torch.Generator(device=device).manual_seed(0)
        R = torch.randn(n, d, device=device, generator=g).requires_grad_()
        fc1 = (torch.randn(n, 2 * D, d, device=device, generator=g) * 0.02).to(dtype).requires_grad_()
        flat = (torch.randn(n * D, d, device=device, generator=g) * 0.02).to(dtype).requires_grad_()

        def ours():  # GroupedExperts' layout: the gate half of [n, 2D, d], a strided view
            erc.erc_loss_from_matrix(erc.activation_matrix(R, fc1[:, :D]), 1.0).backward()

        def floor():  # one GEMM [n, d] x [d, n*D], fp32 norms, autograd's two backward GEMMs
            h = R.to(dtype) @ flat.t()
            h.view(n, n, D).float().norm(dim=-1).sum().backward()

        for fn in (ours, floor):  # warm-up
            fn()
        t_ours = statistics.median(timer(ours) for _ in range(repeats))
        t_floor = statistics.median(timer(floor) for _ in range(repeats))
        rows.append([f"ERC fwd+bwd n={n} d={d} D={D}", f"{t_ours / t_floor:.2f}x floor",
                     f"{t_ours * 1e3:.2f} ms vs floor {t_floor * 1e3:.2f} ms ({str(dtype).split('.')[-1]})"])
    return rows


# ------------------------------------------------------------------------------------------ 4


def bench_experts(model: Model, tokens: int, timer: Timer, repeats: int) -> list[list]:
    from moe_erc.model.layers.experts import GroupedExperts

    cfg, device = model.cfg, model.device
    layer = next(m for m in model.ddp.module.modules() if hasattr(m, "experts") and hasattr(m, "router"))
    grouped = layer.experts
    if not isinstance(grouped, GroupedExperts):
        return [["experts", "skipped", "the model does not use GroupedExperts (transformer-engine present?)"]]
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.process_groups_config import ProcessGroupCollection

    sequential = SequentialMLP(grouped.num_local_experts, model.tf,
                               MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
                               pg_collection=ProcessGroupCollection.use_mpu_process_groups())
    sequential.to(device=grouped.weight1.device, dtype=grouped.weight1.dtype)
    m, d = grouped.num_local_experts, cfg.model.hidden_size
    counts = torch.full((m,), tokens // m, dtype=torch.long)
    x = torch.randn(int(counts.sum()), d, device=device, dtype=grouped.weight1.dtype, requires_grad=True)
    probs = torch.rand(x.shape[0], device=device)

    def run(module):
        out, _ = module(x, counts, probs)
        out.backward(torch.ones_like(out))

    for module in (grouped, sequential):
        run(module)
    t_grouped = statistics.median(timer(lambda: run(grouped)) for _ in range(repeats))
    t_loop = statistics.median(timer(lambda: run(sequential)) for _ in range(repeats))
    flops = 6 * x.shape[0] * d * (3 if grouped.gated else 2) * grouped.ffn_local
    return [[f"experts fwd+bwd, {x.shape[0]} tokens, {m} experts", f"{t_loop / t_grouped:.1f}x faster",
             f"grouped {t_grouped * 1e3:.1f} ms ({flops / t_grouped / 1e12:.1f} TFLOP/s) vs per-expert loop "
             f"{t_loop * 1e3:.1f} ms ({flops / t_loop / 1e12:.1f} TFLOP/s)"]]


# ------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="3b on a GPU, cpu otherwise")
    parser.add_argument("--layers", type=int, help="override model.num_layers")
    parser.add_argument("--micro-batch", type=int)
    parser.add_argument("--micro-batches", type=int)
    parser.add_argument("--erc-micro-batches", type=int)
    parser.add_argument("--expert-tokens", type=int)
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--only", default="step,kernel,experts", help="comma list of: step, kernel, experts")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds for the whole run (default: 150 on a GPU, unlimited on CPU); repeats "
                             "shrink to fit and a row that cannot fit once is reported as skipped")
    parser.add_argument("overrides", nargs="*", help="extra section.key=value config overrides")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
    preset = dict(PRESETS[args.preset or ("3b" if device == "cuda" else "cpu")])
    for key in ("micro_batch", "micro_batches", "erc_micro_batches", "expert_tokens", "repeats"):
        if getattr(args, key) is not None:
            preset[key] = getattr(args, key)
    overrides = [*preset["overrides"], "moe.moe_grouped_gemm=true", "erc.enabled=true",
                 f"training.micro_batch_size={preset['micro_batch']}",
                 f"training.global_batch_size={preset['micro_batch']}",
                 *([f"model.num_layers={args.layers}"] if args.layers else []), *args.overrides]

    from moe_erc.training import parallel
    from moe_erc.compat import prepare_runtime
    from moe_erc.config import load_config

    deadline = Deadline(args.time_budget or (150.0 if device == "cuda" else float("inf")))
    cfg = load_config(None, overrides)
    parallel.initialize(cfg, prepare_runtime(device))
    only = set(args.only.split(","))
    timer, repeats = Timer(device), preset["repeats"]
    rows = []
    try:
        model = Model(cfg, device, preset["vocab"]) if only & {"step", "experts"} else None
        if model is not None:
            print(f"# {model.kernels.summary()} | optimizer {model.kernels.optimizer()}", flush=True)
            print(f"# model built: {deadline.left():.0f} s of {deadline.seconds:.0f} left", flush=True)
        # The short rows first; the step rows take what is left of the budget.
        if "kernel" in only:
            dtype = torch.bfloat16 if device == "cuda" else torch.float32
            rows += bench_erc_kernel(preset["kernel_shapes"], device, dtype, timer, repeats)
        if "experts" in only:
            rows += bench_experts(model, preset["expert_tokens"], timer, repeats)
        if "step" in only:
            rows += bench_steps(model, preset, timer, repeats, deadline)
    finally:
        parallel.destroy()
    name, _ = gpu_peak()
    print(f"\n## moe-erc step benchmark on {name} (torch {torch.__version__}), "
          f"{cfg.model.num_layers} layers, d={cfg.model.hidden_size}, {cfg.moe.num_experts} experts "
          f"top-{cfg.moe.moe_router_topk}, seq {cfg.model.seq_length}\n")
    print("| measure | value | detail |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
