"""Count one training step on CPU: kernel launches and host syncs, by phase and by part of each layer.

A GPU runs ahead of the host only while the host never waits for it. What a CPU run can show about that
is every aten op the step dispatches (a ``TorchDispatchMode``) and every place the host reads a device
value. :func:`count_step` runs one real :class:`moe_erc.training.trainer.Trainer` step (after warm-up steps, on a
step that does not log) under two modes and returns a :class:`StepCount`:

* **launches**: aten ops that start a kernel on a GPU: not views, not allocations, not ops on
  host-resident tensors (below). Collectives count as one launch each.
* **phases**: ``forward`` (inside the forward step), ``backward`` (inside an autograd backward),
  ``optimizer`` (inside ``optimizer.step``) and ``rest`` (gradient reduction, the trainer's read, router
  updates, the LR schedule).
* **parts**: ``attention`` (megatron's self-attention module), ``router``, ``erc`` (the ERC loss),
  ``dispatch`` (the token dispatcher), ``experts``, ``instruments`` (the routing monitor's hooks),
  ``ddp`` (gradient accumulation hooks) and ``other`` (embedding, norms, LM head, loss). Backward ops are
  attributed through tags on the autograd nodes that each part's forward created.
* **host reads**: ``_local_scalar_dense`` (``item``, ``float``, ``bool``), data-dependent shapes
  (``nonzero``, boolean indexing, ``unique``, ``masked_select``), ``tolist``/``numpy``/``cpu`` of device
  tensors, ``torch.tensor`` built from device tensors (one read per element: each is its own copy), and
  blocking host-to-device copies, each with its call site. A **sync point** is a read with device work queued since the previous read: back-to-back reads
  drain the GPU once.

Host-resident tensors (what lives on the host on a GPU too): tensors made by a factory without a
``device`` argument inside the step (the default device is the host), the optimizer's ``step`` counters
(torch's non-capturable optimizers keep them on the host), and everything computed from those alone.
Every other tensor counts as a device tensor.
"""

from __future__ import annotations

import os
import tempfile
import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

PARTS = ("attention", "router", "erc", "dispatch", "experts", "instruments", "ddp", "other")
MOE_PARTS = ("router", "dispatch", "experts", "instruments")
PHASES = ("forward", "backward", "optimizer", "rest")

_NO_LAUNCH = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "lift_fresh",
              "detach", "alias", "_local_scalar_dense", "record_stream", "set_", "resize_", "sym_size",
              "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size", "_nested_tensor_size"}
_DATA_DEPENDENT = {"nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_consecutive",
                   "unique_dim", "nonzero_static_"}
_FACTORIES = {"tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "rand", "randn", "randint",
              "randperm", "linspace", "eye"}  # (the *_like ones follow their input's device)
_TAG = "moe_erc_part"
_THIS_FILE = os.path.abspath(__file__)


def _op_name(func) -> str:
    return func.overloadpacket.__name__ if hasattr(func, "overloadpacket") else str(func)


def _is_view(func) -> bool:
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


def _tensors(tree) -> list[torch.Tensor]:
    out = []

    def visit(x):
        if isinstance(x, torch.Tensor):
            out.append(x)
        elif isinstance(x, (list, tuple)):
            for y in x:
                visit(y)
        elif isinstance(x, dict):
            for y in x.values():
                visit(y)
    visit(tree)
    return out


def _call_site() -> str:
    """The innermost frame outside torch and this module: ``path:line (function)``."""
    for frame in reversed(traceback.extract_stack()[:-1]):
        path = os.path.abspath(frame.filename)
        if path == _THIS_FILE or f"{os.sep}torch{os.sep}" in path or "contextlib" in path:
            continue
        for marker in ("megatron", "moe_erc", "emerging_optimizers", "benchmarks", "tests"):
            if f"{os.sep}{marker}{os.sep}" in path:
                path = path[path.index(f"{os.sep}{marker}{os.sep}") + 1:]
                break
        return f"{path}:{frame.lineno} ({frame.name})"
    return "?"


@dataclass
class StepCount:
    """What one counted step did. ``launches[(phase, part)]``; ``reads`` lists (kind, call site)."""

    launches: Counter = field(default_factory=Counter)
    reads: list = field(default_factory=list)
    sync_points: list = field(default_factory=list)
    h2d_async: list = field(default_factory=list)
    moe_layers: int = 1
    micro_batches: int = 1
    label: str = ""

    @property
    def total_launches(self) -> int:
        return sum(self.launches.values())

    def phase_total(self, phase: str) -> int:
        return sum(v for (p, _), v in self.launches.items() if p == phase)

    def part_total(self, part: str) -> int:
        return sum(v for (_, q), v in self.launches.items() if q == part)

    def moe_block_per_layer_mb(self) -> float:
        """MoE block launches (router, dispatch, experts, instruments; forward + backward) per MoE layer and
        micro-batch."""
        fwd_bwd = sum(v for (p, q), v in self.launches.items() if q in MOE_PARTS and p in ("forward", "backward"))
        return fwd_bwd / (self.moe_layers * self.micro_batches)

    def erc_per_layer(self) -> float:
        return self.part_total("erc") / self.moe_layers

    def as_dict(self) -> dict:
        return {"label": self.label, "launches": self.total_launches,
                "by_phase": {p: self.phase_total(p) for p in PHASES},
                "by_part": {q: self.part_total(q) for q in PARTS},
                "moe_block_per_layer_microbatch": round(self.moe_block_per_layer_mb(), 1),
                "erc_per_layer": round(self.erc_per_layer(), 1),
                "host_syncs": len(self.sync_points), "host_reads": len(self.reads),
                "sync_sites": dict(Counter(site for _, site in self.sync_points)),
                "read_sites": dict(Counter(f"{kind} @ {site}" for kind, site in self.reads)),
                "h2d_async_sites": dict(Counter(self.h2d_async)),
                "moe_layers": self.moe_layers, "micro_batches": self.micro_batches}


class _Tracker:
    """State shared by the two modes: phase, part stack, host-resident storages, counts."""

    def __init__(self, count: StepCount):
        self.count = count
        self.phase = "rest"
        self.parts: list[str] = []
        self.host: dict[int, torch.Tensor] = {}  # storage data_ptr -> a tensor keeping it alive
        self.launched_since_read = True
        self.suspend_reads = 0
        self.paused = 0  # >0: host work (the data loader); nothing is counted

    # host residency ------------------------------------------------------------------------------
    def mark_host(self, tensors) -> None:
        for t in _tensors(tensors):
            if t.device.type == "cpu" and t.untyped_storage().data_ptr():
                self.host[t.untyped_storage().data_ptr()] = t

    def is_host(self, t: torch.Tensor) -> bool:
        return t.untyped_storage().data_ptr() in self.host if t.device.type == "cpu" else False

    def unmark(self, tensors) -> None:
        for t in _tensors(tensors):
            self.host.pop(t.untyped_storage().data_ptr(), None)

    # events --------------------------------------------------------------------------------------
    def part_now(self) -> str:
        if torch._C._current_graph_task_id() != -1:
            node = torch._C._current_autograd_node()
            if node is None:
                return "other"
            tag = node.metadata.get(_TAG)
            if tag is None and "AccumulateGrad" in node.name():
                return "ddp"
            return tag or "other"
        return self.parts[-1] if self.parts else "other"

    def phase_now(self) -> str:
        """``fwd_bwd`` is the schedule outside the forward step: its backward passes, else gradient reduction."""
        if torch._C._current_graph_task_id() != -1:
            return "backward"
        return "rest" if self.phase == "fwd_bwd" else self.phase

    def launch(self) -> None:
        self.count.launches[(self.phase_now(), self.part_now())] += 1
        self.launched_since_read = True

    def read(self, kind: str) -> None:
        if self.suspend_reads:
            return
        site = _call_site()
        self.count.reads.append((kind, site))
        if self.launched_since_read:
            self.count.sync_points.append((kind, site))
        self.launched_since_read = False


class _Dispatch(TorchDispatchMode):
    def __init__(self, tracker: _Tracker):
        super().__init__()
        self.t = tracker

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.t.paused:
            return out
        name = _op_name(func)
        inputs = _tensors((args, kwargs))
        host_only = bool(inputs) and all(self.t.is_host(x) for x in inputs)
        if host_only:
            self.t.mark_host(out)  # computed from host tensors alone: stays on the host
            return out
        if name == "_local_scalar_dense":
            self.t.read("item")
        elif name in _DATA_DEPENDENT or (name in ("index", "index_put", "index_put_") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in _tensors(args[1:2]))):
            self.t.read(name)
            self.t.launch()
        elif name not in _NO_LAUNCH and not _is_view(func):
            self.t.launch()
        return out


class _Functions(TorchFunctionMode):
    """Reads the dispatcher cannot see on CPU (``tolist``, ``numpy``, ``torch.tensor`` of tensors) and
    host-resident factories."""

    def __init__(self, tracker: _Tracker):
        super().__init__()
        self.t = tracker

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        t = self.t
        if t.paused:
            return func(*args, **kwargs)
        first = args[0] if args else None
        device_in = isinstance(first, torch.Tensor) and not t.is_host(first)
        if name in ("tolist", "numpy") and device_in:
            t.read(name)
        elif name == "cpu" and device_in:
            t.read("cpu")
        elif name in ("tensor", "as_tensor") and isinstance(first, (list, tuple)) and any(
                not t.is_host(x) for x in _tensors(first)):
            for _ in [x for x in _tensors(first) if not t.is_host(x)]:  # one copy to the host per element
                t.read(f"torch.{name}(device tensors)")
            t.suspend_reads += 1
            try:
                out = func(*args, **kwargs)
            finally:
                t.suspend_reads -= 1
            return out
        elif name == "to" and isinstance(first, torch.Tensor) and t.is_host(first) and _targets_device(args, kwargs):
            if kwargs.get("non_blocking", False) or (len(args) > 2 and args[2] is True):
                t.count.h2d_async.append(_call_site())
            else:
                t.read("blocking h2d copy")
            out = func(*args, **kwargs)
            if out is first:  # a CPU run returns the tensor itself; on a GPU the copy is a device tensor
                t.unmark(out)
            return out
        out = func(*args, **kwargs)
        if (name in _FACTORIES and func in _torch_factories() and kwargs.get("device") is None
                and not isinstance(first, torch.Tensor)):  # as_tensor(tensor) is that tensor
            t.mark_host(out)  # no device given: made on the host (the default device on a GPU run too)
        return out


def _targets_device(args, kwargs) -> bool:
    target = kwargs.get("device", args[1] if len(args) > 1 else None)
    return isinstance(target, (torch.device, str)) or isinstance(target, torch.Tensor)


def _torch_factories():
    return {getattr(torch, n) for n in _FACTORIES}


# ---------------------------------------------------------------------------------------- parts


def _tag_graph(outputs, part: str) -> None:
    """Tag the autograd nodes reachable from ``outputs`` that no inner part tagged (leaves excluded)."""
    stack = [t.grad_fn for t in _tensors(outputs) if t.grad_fn is not None]
    seen = set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen or "AccumulateGrad" in node.name():
            continue
        seen.add(id(node))
        if _TAG in node.metadata:
            continue
        node.metadata[_TAG] = part
        stack.extend(fn for fn, _ in node.next_functions)


def _part_of(name: str, module) -> Optional[str]:
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "self_attention":
        return "attention"
    if leaf == "router":
        return "router"
    if leaf == "experts" and hasattr(module, "forward") and "experts." not in name:
        return "experts"
    return None


class _Parts:
    """Installs the part bookkeeping on a model (module hooks, dispatcher and ERC wrappers, monitor hooks)."""

    def __init__(self, tracker: _Tracker, model_chunks, monitor):
        self.t = tracker
        self.undo: list = []
        for chunk in model_chunks:
            for name, module in chunk.named_modules():
                part = _part_of(name, module)
                if part is not None:
                    self._hook_module(module, part)
                dispatcher = getattr(module, "token_dispatcher", None)
                if dispatcher is not None:
                    for method in ("dispatch_preprocess", "token_dispatch", "dispatch_postprocess",
                                   "combine_preprocess", "token_combine", "combine_postprocess"):
                        self._wrap(dispatcher, method, "dispatch")
                if hasattr(module, "erc_loss_and_stats"):
                    self._wrap(module, "erc_loss_and_stats", "erc")
        for handle in getattr(monitor, "_handles", []):
            for chunk in model_chunks:
                for module in chunk.modules():
                    hooks = module._forward_hooks
                    if handle.id in hooks:
                        hook = hooks[handle.id]
                        hooks[handle.id] = self._in_part(hook, "instruments")
                        self.undo.append(lambda h=hooks, i=handle.id, f=hook: h.__setitem__(i, f))

    def _in_part(self, fn, part):
        t = self.t

        def wrapped(*args, **kwargs):
            t.parts.append(part)
            try:
                out = fn(*args, **kwargs)
            finally:
                t.parts.pop()
            _tag_graph(out, part)
            return out
        return wrapped

    def _wrap(self, owner, method: str, part: str) -> None:
        original = getattr(owner, method)
        setattr(owner, method, self._in_part(original, part))
        self.undo.append(lambda: owner.__dict__.pop(method, None))

    def _hook_module(self, module, part: str) -> None:
        t = self.t

        def pre(_module, _inputs):
            t.parts.append(part)

        def post(_module, _inputs, outputs):
            t.parts.pop()
            _tag_graph(outputs, part)

        handles = [module.register_forward_pre_hook(pre), module.register_forward_hook(post, prepend=True)]
        self.undo.append(lambda: [h.remove() for h in handles])

    def remove(self) -> None:
        for fn in reversed(self.undo):
            fn()


def _optimizer_steps(optimizer) -> list[torch.Tensor]:
    """torch optimizers' ``step`` counters (host tensors unless capturable/fused) inside megatron's wrappers."""
    found, stack = [], [optimizer]
    while stack:
        opt = stack.pop()
        if hasattr(opt, "chained_optimizers"):
            stack.extend(opt.chained_optimizers)
            continue
        inner = getattr(opt, "optimizer", None)
        if inner is not None and inner is not opt:
            stack.append(inner)
        for state in getattr(opt, "state", {}).values() if isinstance(getattr(opt, "state", None), dict) else []:
            step = state.get("step") if isinstance(state, dict) else None
            if isinstance(step, torch.Tensor):
                found.append(step)
    return found


class _HostIterator:
    """The data loader is host work (a worker process on a real run): batches come out uncounted, on the host."""

    def __init__(self, iterator, tracker: _Tracker):
        self.iterator, self.t = iterator, tracker

    def __iter__(self):
        return self

    def __next__(self):
        self.t.paused += 1
        try:
            batch = next(self.iterator)
        finally:
            self.t.paused -= 1
        self.t.mark_host(batch)
        return batch


def _count_stream_syncs(tracker: _Tracker):
    """Stream/event/device synchronize calls as reads. On CPU megatron sees the compat layer's stand-ins
    (no-ops); wrap theirs, and torch.cuda's own where it is the real one."""
    targets = []
    try:
        from moe_erc.compat import cpu

        targets += [(cpu._NullEvent, "synchronize"), (cpu._NullStream, "synchronize"),
                    (cpu._CudaOnCpu, "synchronize")]
    except ImportError:  # pragma: no cover
        pass
    undo = []
    for owner, name in targets:
        original = owner.__dict__[name]
        fn = original.__func__ if isinstance(original, staticmethod) else original

        def counted(*args, _fn=fn, _kind=f"{owner.__name__.strip('_')}.{name}", **kwargs):
            tracker.read(_kind)
            return _fn(*args, **kwargs)
        setattr(owner, name, staticmethod(counted) if isinstance(original, staticmethod) else counted)
        undo.append((owner, name, original))

    def restore():
        for owner, name, original in undo:
            setattr(owner, name, original)
    return restore


def _host_copies(tracker: _Tracker):
    """megatron's dispatcher copies its split sizes to the host asynchronously (``maybe_move_tensor_to_cpu`` on a
    side stream), then waits once (an event synchronize: the sync point). On CPU the compat layer's stand-in
    converts them in place (``numpy()``): not reads of their own; what they return is host-resident."""
    from megatron.core.transformer.moe import token_dispatcher

    original = token_dispatcher.maybe_move_tensor_to_cpu

    def moved(*args, **kwargs):
        tracker.suspend_reads += 1
        try:
            out = original(*args, **kwargs)
        finally:
            tracker.suspend_reads -= 1
        if isinstance(out, torch.Tensor):
            tracker.mark_host(out)
        return out
    token_dispatcher.maybe_move_tensor_to_cpu = moved

    def restore():
        token_dispatcher.maybe_move_tensor_to_cpu = original
    return restore


def count_calls(fn, *args, host=(), **kwargs) -> StepCount:
    """Count ``fn(*args, **kwargs)`` (phase ``rest``, no parts): for checking the counter on small code.
    ``host``: tensors that live on the host."""
    count = StepCount()
    tracker = _Tracker(count)
    tracker.mark_host(list(host))
    with _Functions(tracker), _Dispatch(tracker):
        fn(*args, **kwargs)
    return count


def _in_phase(tracker: _Tracker, phase: str, fn):
    """``fn`` with the tracker's phase set to ``phase`` while it runs."""

    def wrapped(*args, **kwargs):
        previous, tracker.phase = tracker.phase, phase
        try:
            return fn(*args, **kwargs)
        finally:
            tracker.phase = previous
    return wrapped


def count_trainer_step(trainer, label: str = "") -> StepCount:
    """Run ``trainer.train_step`` once under the counters (the caller warmed it up); advance its step."""
    cfg = trainer.cfg
    moe_layers = sum(1 for chunk in trainer.model for m in chunk.modules() if hasattr(m, "token_dispatcher"))
    count = StepCount(moe_layers=max(moe_layers, 1), micro_batches=trainer.num_microbatches, label=label)
    tracker = _Tracker(count)
    tracker.mark_host(_optimizer_steps(trainer.optimizer))
    for chunk in trainer.model:  # megatron's chunk-sorting indices live on the host without permute fusion
        for module in chunk.modules():
            dispatcher = getattr(module, "token_dispatcher", None)
            if str(getattr(dispatcher, "permute_idx_device", "")) == "cpu":
                tracker.mark_host([dispatcher.sort_input_by_local_experts, dispatcher.restore_output_by_local_experts])
    parts = _Parts(tracker, trainer.model, trainer.monitor)
    counted_forward = _in_phase(tracker, "forward", trainer._forward_step)
    counted_optimizer_step = _in_phase(tracker, "optimizer", trainer.optimizer.step)
    counted_forward_backward = _in_phase(tracker, "fwd_bwd", trainer.forward_backward)

    trainer._forward_step = counted_forward
    trainer.optimizer.step = counted_optimizer_step
    trainer.forward_backward = counted_forward_backward
    data = _HostIterator(trainer._budget_iterator, tracker)
    undo_syncs = _count_stream_syncs(tracker)
    undo_moves = _host_copies(tracker)
    try:
        with _Functions(tracker), _Dispatch(tracker):
            trainer.train_step(data)
    finally:
        del trainer._forward_step, trainer.forward_backward
        trainer.optimizer.__dict__.pop("step", None)
        parts.remove()
        undo_syncs()
        undo_moves()
    trainer.step += 1
    trainer.consumed_samples += cfg.training.global_batch_size
    return count


def build_trainer(cfg):
    """A :class:`Trainer` for counting: nothing logged, evaluated or saved during the counted steps."""
    from moe_erc.training.trainer import Trainer

    trainer = Trainer(cfg)
    trainer._budget_iterator = trainer._data_iterator(trainer.train_ds, 0)
    return trainer


def count_step(cfg, warmup: int = 2, label: str = "") -> StepCount:
    """Build a trainer for ``cfg`` in this process, run ``warmup`` steps, count the next one, tear down."""
    from moe_erc.training import parallel

    trainer = build_trainer(cfg)
    try:
        for _ in range(warmup):
            trainer.train_step(trainer._budget_iterator)
            trainer.step += 1
        from moe_erc.training.metrics import clear_moe_layer_metrics

        clear_moe_layer_metrics()
        return count_trainer_step(trainer, label)
    finally:
        trainer.close()
        parallel.destroy()


def budget_overrides(run_dir: str, data_path: Optional[str] = None, device: str = "cpu") -> list[str]:
    """3B shapes scaled down: 4 layers, d=256, 64 experts top-8, expert width 128, seq 256, bf16,
    2 micro-batches, grouped experts, a step that neither logs, evaluates nor saves."""
    out = ["model.num_layers=4", "model.hidden_size=256", "model.num_attention_heads=4", "model.seq_length=256",
           "model.ffn_hidden_size=512", "moe.num_experts=64", "moe.moe_router_topk=8",
           "moe.moe_ffn_hidden_size=128", "moe.moe_grouped_gemm=true", "training.precision=bf16",
           f"training.device={device}", "training.micro_batch_size=1", "training.global_batch_size=2",
           "training.train_iters=100", "training.eval_iters=0", "training.eval_interval=1000",
           "training.resume=none", "logging.log_interval=1000", "logging.tensorboard=false",
           "logging.progress=false", "checkpoint.save_interval=1000", f"logging.run_dir={run_dir}"]
    if data_path:
        out.append(f"data.data_path={data_path}")
    return out


VARIANTS = {
    "vanilla": [],
    "erc": ["erc.enabled=true"],
    "aoe": ["moe.router=aoe"],
    "kmeans": ["moe.router=kmeans", "moe.moe_router_load_balancing_type=none", "moe.moe_aux_loss_coeff=0"],
    "auxfree": ["moe.moe_router_score_function=sigmoid", "moe.moe_router_enable_expert_bias=true",
                "moe.moe_router_load_balancing_type=none", "moe.moe_aux_loss_coeff=0"],
    # DeepSeek-V3's shape (configs/tiny-deepseek.yaml): MLA, a dense first layer, a shared expert, group-limited
    # sigmoid routing with expert bias and routed scaling, one MTP layer, with ERC.
    "deepseek": ["model.multi_latent_attention=true", "model.kv_lora_rank=64", "model.qk_head_dim=64",
                 "model.qk_pos_emb_head_dim=32", "model.v_head_dim=64", "model.qk_layernorm=true",
                 "model.moe_layer_freq=[0,1,1,1]", "model.mtp_num_layers=1",
                 "moe.moe_shared_expert_intermediate_size=256", "moe.moe_router_num_groups=8",
                 "moe.moe_router_group_topk=4", "moe.moe_router_topk_scaling_factor=2.5",
                 "moe.moe_router_score_function=sigmoid", "moe.moe_router_enable_expert_bias=true",
                 "moe.moe_router_load_balancing_type=seq_aux_loss", "moe.moe_aux_loss_coeff=0.0001",
                 "erc.enabled=true"],
}


def format_table(counts: list[StepCount]) -> str:
    """One row per counted step; then each step's sync and read sites."""
    head = (f"{'variant':<24} {'launches':>8} {'fwd':>6} {'bwd':>6} {'optim':>6} {'rest':>5} | "
            + " ".join(f"{p[:6]:>6}" for p in PARTS)
            + f" | {'MoE/l/mb':>8} {'ERC/l':>6} | {'syncs':>5} {'reads':>5}")
    lines = [head, "-" * len(head)]
    for c in counts:
        lines.append(f"{c.label:<24} {c.total_launches:>8} " + " ".join(
            f"{c.phase_total(p):>{w}}" for p, w in zip(PHASES, (6, 6, 6, 5))) + " | "
            + " ".join(f"{c.part_total(p):>6}" for p in PARTS)
            + f" | {c.moe_block_per_layer_mb():>8.1f} {c.erc_per_layer():>6.1f} | "
              f"{len(c.sync_points):>5} {len(c.reads):>5}")
    for c in counts:
        if c.reads or c.h2d_async:
            lines.append(f"\n{c.label}: host reads (* = sync point)")
            syncs = Counter(site for _, site in c.sync_points)
            for (kind, site), n in Counter(c.reads).items():
                lines.append(f"  {n:>4} x {kind:<28} {site}{'  *' * (syncs[site] > 0)}")
            for site, n in Counter(c.h2d_async).items():
                lines.append(f"  {n:>4} x {'async h2d copy':<28} {site}")
    return "\n".join(lines)


def scratch_dir() -> str:
    return tempfile.mkdtemp(prefix="moe-erc-budget-")
