"""The training loop: config -> (data, model) -> steps -> metrics and checkpoints.

Entry points: ``moe-erc train`` (:mod:`moe_erc.cli`) and ``torchrun ... -m moe_erc.train``.

One step = ``global_batch_size`` sequences = ``global_batch_size / (micro_batch_size * dp)`` micro-batches
per data-parallel rank, run by megatron-core's forward-backward schedule (with or without pipelining),
gradients reduced by megatron DDP, then one optimizer step and one LR-schedule step.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from functools import partial
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state  # noqa: E402  (importable: moe_erc.compat ran first)
from megatron.core.distributed import finalize_model_grads  # noqa: E402
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: E402
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler  # noqa: E402

from moe_erc.compat import comm_device, prepare_runtime
from moe_erc.config import Config, data_parallel_size, layer_rows
from moe_erc.data.corpus import resolve_data_path
from moe_erc.data.datasets import (build_dataloader, build_gpt_datasets, check_indexed_dataset, check_token_ids,
                                   move_batch, parse_data_path)
from moe_erc.data.tokenizer import resolve_tokenizer
from moe_erc.errors import DataError
from moe_erc.outputs import WriterLock
from moe_erc.model.gpt import (build_model, compile_layers, count_parameters, padded_vocab_size, resolve_precision,
                               transformer_config)
from moe_erc.model.layers import routers
from moe_erc.model.layers.erc_layer import set_training_step
from moe_erc.model.layers.kernels import detect as detect_kernels
from moe_erc.model.layers.spec import attention_backend
from moe_erc.training import checkpoint, metrics, parallel
from moe_erc.training.finite import NonFinitePolicy, all_finite, gradient_buffers, tensor_finite
from moe_erc.training.instruments import RoutingMonitor, layer_summaries
from moe_erc.training.memory_check import check_fits
from moe_erc.training.optimizer import build_optimizer, build_scheduler, wrap_ddp
from moe_erc.training.optimizer import describe as describe_optimizer


_ATTENTION = {"te": "transformer-engine", "sdpa": "torch SDPA", "local": "megatron unfused"}


def _loss_func(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """Token-mean LM loss of one micro-batch; reports (sum, count) so means are exact across ranks."""
    mask = loss_mask.view(-1).float()
    loss_sum = (per_token_loss.view(-1).float() * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), mask.sum()])
    return loss_sum, num_tokens, {"lm loss": report}


# Test hook (tests/training/test_reliability.py): make the loss of this (0-based) step NaN.
NAN_TEST_ENV = "MOE_ERC_TEST_NAN_AT_STEP"
# Test hook (tests/training/test_reliability.py): "RANK@STEP" SIGKILLs that rank after STEP, in the first attempt only.
KILL_TEST_ENV = "MOE_ERC_TEST_KILL_AT_STEP"


def _maybe_die_for_tests(rank: int, step: int) -> None:
    target = os.environ.get(KILL_TEST_ENV)
    if target and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0" and target == f"{rank}@{step}":
        os.kill(os.getpid(), signal.SIGKILL)


class GracefulStop:
    """SIGTERM / SIGINT ask the loop to save and stop after the current step (agreed by all ranks)."""

    def __init__(self):
        self.signal_name: Optional[str] = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def local_flag(self) -> bool:
        return self.signal_name is not None

    def agreed(self, any_rank: bool) -> bool:
        """``any_rank``: some rank was signalled (the trainer all-reduces the flags with its own)."""
        if any_rank and self.signal_name is None:
            self.signal_name = "a signal on another rank"
        return any_rank

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


class Trainer:
    """Owns the model chunks, optimizer, schedule, data and outputs of one run."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.device = prepare_runtime(cfg.training.device)
        self.topo = parallel.initialize(cfg, self.device)
        self.compute_device = parallel.compute_device(self.device)  # where batches go (cuda:LOCAL_RANK or cpu)
        self.is_logger = self.topo.is_logging_rank
        self.run_dir = Path(cfg.logging.run_dir)
        self.ckpt_dir = Path(cfg.checkpoint.dir or self.run_dir / "checkpoints")
        self.run_lock = checkpoint.prepare_run_dir(cfg, self.run_dir, self.ckpt_dir)
        self.precision = resolve_precision(cfg, self.device)

        # data
        data_path = resolve_data_path(cfg.data.data_path, cfg.data.embedded_vocab_size, self.topo.rank == 0)
        self.prefixes, _ = parse_data_path(data_path)
        for prefix in self.prefixes:
            check_indexed_dataset(prefix)
        self.tokenizer = resolve_tokenizer(self.prefixes, cfg.tokenizer.path)
        if self.topo.rank == 0:  # the run directory is self-contained: `moe-erc export` reads this copy
            self.tokenizer.save(self.run_dir / "tokenizer.json")
        t = cfg.training
        self.dp = data_parallel_size(cfg, self.topo.world_size)
        self.num_microbatches = t.global_batch_size // (t.micro_batch_size * self.dp)
        self.train_ds, self.valid_ds, _ = build_gpt_datasets(
            data_path, cfg.data.split, cfg.model.seq_length, t.seed, self.tokenizer,
            train_samples=t.train_iters * t.global_batch_size,
            valid_samples=t.eval_iters * t.global_batch_size if t.eval_iters else 0,
            test_samples=0,
            cache_dir=cfg.data.cache_dir or str(Path(self.prefixes[0]).parent / "index-cache"),
        )
        if self.train_ds is None:
            raise DataError(f"data.split='{cfg.data.split}' leaves no training documents; give train a weight")

        # model, DDP, optimizer, schedule
        self.kernels = detect_kernels(self.device, cfg.training.fused_kernels)
        self.tf_config = transformer_config(cfg, self.precision, self.kernels)
        if cfg.model.vocab_size is not None and self.tokenizer.vocab_size > cfg.model.vocab_size:
            raise DataError(f"the tokenizer has {self.tokenizer.vocab_size} tokens but model.vocab_size="
                            f"{cfg.model.vocab_size}; raise model.vocab_size or remove it")
        vocabulary = max(self.tokenizer.vocab_size, cfg.model.vocab_size or 0)
        self.vocab_size = padded_vocab_size(vocabulary, cfg)
        checkpoint.on_rank0(lambda: check_token_ids(self.prefixes, vocabulary))  # ids the embedding has no row for
        check_fits(cfg, self.tf_config, self.vocab_size, self.topo.world_size, self.precision, self.device)
        model = build_model(cfg, self.tf_config, self.vocab_size)
        self.compiled_layers = compile_layers(model) if t.compile else 0
        self.num_params = self._global_param_count(model)
        self.model = [wrap_ddp(cfg, self.tf_config, model)]
        self.optimizer = build_optimizer(cfg, self.tf_config, self.model)
        self.scheduler = build_scheduler(cfg, self.optimizer)
        self.tf_config.finalize_model_grads_func = finalize_model_grads
        self.tf_config.no_sync_func = self.model[0].no_sync
        if self.tf_config.fp16:
            self.tf_config.grad_scale_func = self.optimizer.scale_loss
        self.forward_backward = get_forward_backward_func()
        # megatron keeps the MoE aux-loss scale in a class attribute and copies into it: a model built earlier
        # in this process (tests, benchmarks) may have left one of another shape.
        MoEAuxLossAutoScaler.main_loss_backward_scale = None
        self._nan_test_step = int(os.environ.get(NAN_TEST_ENV, "-1"))

        self.stopper: Optional[GracefulStop] = None  # set while train() runs
        self._stop_requested = False
        start = checkpoint.restore(cfg, self.ckpt_dir, self.model, self.optimizer, self.scheduler, say=self._say)
        self.step = start.get("step", 0)
        self.consumed_samples = start.get("consumed_samples", 0)
        self.on_non_finite = NonFinitePolicy(t, self.run_dir, self.ckpt_dir, self.is_logger, say=self._say)
        self.writer = metrics.MetricsWriter(cfg, self.run_dir, enabled=self.is_logger, start_step=self.step,
                                            say=self._say)
        log = cfg.logging
        self.monitor = RoutingMonitor(self.model, layer_rows(cfg), cfg.moe.num_experts,
                                      run_dir=self.run_dir if log.routing_trace else None,
                                      trace_interval=log.trace_interval if log.routing_trace else 0,
                                      trace_tokens=log.trace_tokens, coupling_tokens=log.coupling_tokens,
                                      seed=t.seed)

    # ------------------------------------------------------------------ setup helpers

    def _global_param_count(self, model) -> int:
        """Parameters of the whole model (experts and TP shards counted once)."""
        dense = sum(p.numel() for p in model.parameters() if getattr(p, "allreduce", True))
        expert = count_parameters(model) - dense
        dense_t = torch.tensor([dense], dtype=torch.float64, device=comm_device())
        expert_t = torch.tensor([expert], dtype=torch.float64, device=comm_device())
        dist.all_reduce(dense_t, group=parallel_state.get_tensor_model_parallel_group())
        dist.all_reduce(dense_t, group=parallel_state.get_pipeline_model_parallel_group())
        dist.all_reduce(expert_t, group=parallel_state.get_expert_tensor_and_model_parallel_group())
        dist.all_reduce(expert_t, group=parallel_state.get_pipeline_model_parallel_group())
        return int(dense_t.item() + expert_t.item())

    def _say(self, text: str) -> None:
        if self.is_logger:
            print(text, flush=True)

    # ------------------------------------------------------------------ steps

    def _forward_step(self, data_iterator: Iterator[dict], model):
        batch = next(data_iterator)
        self.monitor.set_batch(self.step, batch["tokens"])  # the host copy: the routing trace reads it there
        batch = move_batch(batch, self.compute_device)
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        if self._nan_test_step == self.step and model.training:
            output = output * float("nan")  # test hook: a non-finite loss and gradients at this step
        return output, partial(_loss_func, batch["loss_mask"])

    def _data_iterator(self, dataset, consumed_samples: int):
        return iter(build_dataloader(dataset, self.cfg.training.micro_batch_size, self.topo.dp_rank,
                                     self.dp, consumed_samples=consumed_samples,
                                     num_workers=self.cfg.data.num_workers,
                                     pin_memory=self.compute_device.type == "cuda"))

    def _lm_loss_sums(self, losses: list[dict]) -> torch.Tensor:
        """``[loss sum, token count]`` over micro-batches and DP ranks, on the device (no host sync)."""
        total = torch.zeros(2, dtype=torch.float64, device=comm_device())
        for item in losses:
            total += item["lm loss"].double().to(total.device)
        dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
        return total

    def _reduce_lm_loss(self, losses: list[dict]) -> float:
        """Token-weighted mean over micro-batches and DP ranks (NaN off the last pipeline stage)."""
        loss_sum, count = self._lm_loss_sums(losses).tolist()
        return loss_sum / count if count > 0 else float("nan")

    def train_step(self, data_iterator) -> dict:
        """One optimizer step over ``num_microbatches`` micro-batches. Returns scalars for logging."""
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        set_training_step(self.step)
        self.monitor.step_counts.zero_()  # MaxVio is per batch
        losses = self.forward_backward(
            forward_step_func=self._forward_step,
            data_iterator=data_iterator,
            model=self.model,
            num_microbatches=self.num_microbatches,
            seq_length=self.cfg.model.seq_length,
            micro_batch_size=self.cfg.training.micro_batch_size,
            forward_only=False,
        )
        lr = self.scheduler.get_lr({})  # the base rate this step uses (param_lr classes scale with it)
        lm_loss, finite, self._stop_requested = self._read_step(losses)
        if not finite:
            routers.end_of_step(self.model, applied=False)  # e.g. K-Means drops this step's statistics
            return {"lm_loss": lm_loss, "lr": lr, "grad_norm": float("nan"), "skipped": 1, "non_finite": True}
        updated, grad_norm, _ = self.optimizer.step()
        routers.end_of_step(self.model, applied=bool(updated))
        self.scheduler.step(increment=1)
        return {
            "lm_loss": lm_loss,
            "grad_norm": grad_norm if grad_norm is not None else float("nan"),  # on the device: read when logged
            "lr": lr,
            "skipped": 0 if updated else 1,
        }

    def _read_step(self, losses: list[dict]) -> tuple[float, bool, bool]:
        """(mean LM loss, loss and gradients finite on every rank, a stop signal on some rank).

        The step's one host synchronisation (``benchmarks/step_budget.py`` counts it): the three values are
        reduced on the device and read in one transfer. The gradient norm stays on the device (moe_erc.model.layers.
        sync_free) and is read only on logging steps. The finite check is a
        min/max reduction per gradient buffer (:mod:`moe_erc.training.finite`): no memory proportional to the model.
        """
        device = comm_device()
        total = self._lm_loss_sums(losses)
        ok = all_finite(gradient_buffers(self.model), device)
        if losses:  # ranks without the loss (earlier pipeline stages) vote on gradients only
            ok &= tensor_finite(total)
        # torch.full launches a fill; torch.tensor(host value) would copy from the host and wait for the stream
        stop = torch.full((), bool(self.stopper and self.stopper.local_flag()), dtype=torch.bool, device=device)
        flags = torch.stack([~ok, stop]).to(torch.int32)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        loss_sum, count, bad, stop_any = torch.cat([total, flags.double()]).tolist()
        stop_agreed = self.stopper.agreed(bool(stop_any)) if self.stopper else False
        return (loss_sum / count if count > 0 else float("nan")), not bad, stop_agreed

    @torch.no_grad()
    def evaluate(self) -> Optional[float]:
        """LM loss on the same ``eval_iters`` validation batches every time (comparable across evals)."""
        if self.valid_ds is None or self.cfg.training.eval_iters == 0:
            return None
        for chunk in self.model:
            chunk.eval()
        self.monitor.start_validation()
        iterator = self._data_iterator(self.valid_ds, 0)
        losses = []
        for _ in range(self.cfg.training.eval_iters):
            losses += self.forward_backward(
                forward_step_func=self._forward_step, data_iterator=iterator, model=self.model,
                num_microbatches=self.num_microbatches, seq_length=self.cfg.model.seq_length,
                micro_batch_size=self.cfg.training.micro_batch_size, forward_only=True)
        metrics.clear_moe_layer_metrics()
        for chunk in self.model:
            chunk.train()
        self._valid_instruments = layer_summaries(self.monitor.valid_stats())
        return self._reduce_lm_loss(losses)

    def save(self) -> Path:
        state = {"step": self.step, "consumed_samples": self.consumed_samples}
        return checkpoint.save(self.ckpt_dir, self.step, self.model, self.optimizer, self.scheduler, state,
                               with_optimizer=self.cfg.checkpoint.save_optimizer,
                               keep_last=self.cfg.checkpoint.keep_last,
                               describe={"config": self.cfg.to_dict(), "padded_vocab_size": self.vocab_size})

    def _interval_save(self) -> None:
        """A save at a save interval; with ``checkpoint.on_save_error=continue`` a full disk skips it, loudly."""
        try:
            self.save()
        except checkpoint.DiskFullError as exc:
            if self.cfg.checkpoint.on_save_error == "stop":
                raise
            self._say(f"WARNING: checkpoint at step {self.step} NOT saved, training goes on "
                      f"(checkpoint.on_save_error=continue): {exc}")

    # ------------------------------------------------------------------ the loop

    def train(self) -> dict:
        cfg, t = self.cfg, self.cfg.training
        tokens_per_step = t.global_batch_size * cfg.model.seq_length
        self._say(self._banner())
        progress = metrics.Progress(t.train_iters, self.step, enabled=self.is_logger and cfg.logging.progress)
        summary = {"first_valid_loss": None, "valid_loss": None, "train_loss": None, "step": self.step,
                   "run_dir": str(self.run_dir)}
        if self.step >= t.train_iters:
            self._say(f"already trained to step {self.step} >= training.train_iters={t.train_iters}; nothing to do "
                      f"(raise training.train_iters, or start over with training.resume=none or a new logging.run_dir)")
            return summary
        if self.step == 0:
            summary["first_valid_loss"] = self._run_eval()
        data_iterator = self._data_iterator(self.train_ds, self.consumed_samples)
        stop_at = t.train_iters if t.exit_interval is None else min(t.train_iters, self.step + t.exit_interval)
        window_start, window_steps = time.perf_counter(), 0
        stopper = self.stopper = GracefulStop()
        while self.step < stop_at:
            scalars = self.train_step(data_iterator)
            self.step += 1
            self.consumed_samples += t.global_batch_size
            window_steps += 1
            if scalars.pop("non_finite", False):
                self.on_non_finite(self.step, scalars["lm_loss"], self.model,
                                   (lambda: metrics.erc_scalars(self.model, cfg)) if cfg.erc.enabled else None)
            if self.step % cfg.logging.log_interval == 0 or self.step == stop_at:
                elapsed = time.perf_counter() - window_start
                scalars["tokens_per_s"] = tokens_per_step * window_steps / elapsed
                scalars["step_time_s"] = elapsed / window_steps
                record = metrics.train_record(scalars, self.model, cfg, self.monitor, self.num_microbatches)
                self.writer.write(self.step, "train", record)
                progress.report(self.step, record)
                summary["train_loss"] = scalars["lm_loss"]
                window_start, window_steps = time.perf_counter(), 0
            else:
                metrics.clear_moe_layer_metrics()
            if self.step % t.eval_interval == 0 and self.step < t.train_iters:
                self._run_eval()
            if self.step % cfg.checkpoint.save_interval == 0 and self.step < stop_at:
                self._interval_save()
            _maybe_die_for_tests(self.topo.rank, self.step)
            if self._stop_requested:
                final_dir = self.save()
                self._say(f"stopped by {stopper.signal_name} at step {self.step}; checkpoint {final_dir} "
                          f"(run the same command to resume)")
                summary.update(step=self.step, checkpoint=str(final_dir), interrupted=True)
                stopper.restore()
                return summary
        stopper.restore()
        summary["valid_loss"] = self._run_eval()
        final_dir = self.save()
        self._say(f"done: step {self.step}, checkpoint {final_dir}, metrics {self.run_dir / 'metrics.jsonl'}")
        summary.update(step=self.step, checkpoint=str(final_dir), run_dir=str(self.run_dir))
        return summary

    def _run_eval(self) -> Optional[float]:
        loss = self.evaluate()
        if loss is not None:
            # Post-hoc ERC loss at alpha=1 (clean rows) and eps for every method with a router matrix.
            posthoc = metrics.router_scalars(self.model, self.cfg, posthoc_alpha=1.0)
            self.writer.write(self.step, "valid", {"lm_loss": loss, "ppl": math.exp(min(loss, 50)),
                                                   **self._valid_instruments, **posthoc})
            self._say(f"validation at step {self.step}: loss {loss:.4f} | ppl {math.exp(min(loss, 50)):.1f}")
        return loss

    def _banner(self) -> str:
        cfg, p = self.cfg, self.cfg.parallel
        return (f"moe-erc: {self.num_params / 1e6:.2f}M parameters, {cfg.model.num_layers} layers, "
                f"{cfg.moe.num_experts} experts top-{cfg.moe.moe_router_topk}, "
                f"ERC {'on (alpha=%g)' % cfg.erc.alpha if cfg.erc.enabled else 'off'} | "
                f"world {self.topo.world_size} = TP{p.tensor_model_parallel_size} x "
                f"PP{p.pipeline_model_parallel_size} x DP{self.dp} (EP{p.expert_model_parallel_size}) | "
                f"{self.compute_device}, {self.precision} | vocab {self.tokenizer.vocab_size} "
                f"(padded {self.vocab_size}) | run dir {self.run_dir}\n"
                f"moe-erc: {self.kernels.summary()} | attention {_ATTENTION[attention_backend(cfg)]} | "
                f"optimizer {describe_optimizer(cfg, self.model, self.kernels.optimizer())}"
                f"{self._compile_note()}")

    def _compile_note(self) -> str:
        if not self.compiled_layers:
            return ""
        if os.environ.get("TORCH_COMPILE_DISABLE", "0") not in ("", "0"):
            return " | training.compile=true has no effect: TORCH_COMPILE_DISABLE is set"
        return f" | torch.compile: {self.compiled_layers} layers"

    def close(self) -> None:
        self.monitor.close()
        self.writer.close()
        if self.run_lock is not None:
            self.run_lock.release()


def run(cfg: Config) -> dict:
    """Train with ``cfg`` in this process (one rank of the launch). Returns the run summary."""
    trainer = None
    try:
        trainer = Trainer(cfg)
        return trainer.train()
    finally:
        if trainer is not None:
            trainer.close()
        WriterLock.release_all()  # a run that failed while starting holds its run directory's lock still
        if dist.is_initialized():
            parallel.destroy()
