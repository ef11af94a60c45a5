"""The training loop on megatron-core: TP x PP x DP, DDP, (distributed) optimizer, pipeline
schedules, dist-checkpointing, validation and logging. One code path for CPU and GPU.

    trainer = Trainer(cfg)   # process groups, model, optimizer, data, resume
    trainer.train()          # until train.steps, a stop signal, or exit_after_steps
"""

from __future__ import annotations

import dataclasses
import json
import random
import signal
import sys
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_pn import checkpoint, compat
from megatron_pn.config import Config
from megatron_pn.data import (StepSampler, build_datasets, cluster_ids_of, micro_batch_loader,
                              resolve_blend, token_ids)
from megatron_pn.distributed import agreed, init_distributed
from megatron_pn.distill import build_teacher, distillation_loss
from pn_base.fileio import atomic_write_json
from megatron_pn.run_tokenizer import run_tokenizer
from pn_base.outputs import COST, FINISHED
from megatron_pn.metrics import (MetricsLogger, device_description, device_peak_tflops,
                                 peak_memory)
from megatron_pn.mix import expert_job
from megatron_pn.engines import ENGINES
from megatron_pn.evaluate import evaluate_set
from megatron_pn.model import build_model, flops_per_token, transformer_config
from megatron_pn.pn import projected_once
from megatron_pn.preflight import check_writable_dir
from megatron_pn.checks import check_config

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Trainer:
    def __init__(self, cfg: Config):
        self.lock = None  # rank 0's lock on checkpoint.dir, held until train() ends
        # the stop handlers are ours until train() ends (in-process callers get theirs back)
        self.previous_handlers = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
        try:
            self._start(cfg)
        except BaseException:
            self.close()
            raise

    def _start(self, cfg: Config) -> None:
        self.start_time, self.start_cpu = time.time(), time.process_time()
        # Handlers first: a stop signal during the (minutes-long) start-up must not kill us.
        self._stop_requested = False
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._request_stop)
        self.device_type = compat.activate()
        self.env = init_distributed(self.device_type)
        warnings = check_config(cfg, self.env.world_size, self.device_type)
        cfg = expert_job(cfg)  # SLM-mix: this job's cluster and directories
        self.cfg = cfg = finetuning_lr(cfg)
        for warning in warnings:
            self._warn(warning)
        self.step = 0
        self.early_stopping = {"best": float("inf"), "best_step": None, "evals_since_best": 0}
        self.initial_weights = None
        resume_from = self._checkpoint_to_resume()
        # Data, the checkpoint started from and the teacher: one tokenizer (before any work).
        start = resume_from or self._weights_to_load()
        self.tokenizer = run_tokenizer(cfg, start)
        self._check_model_fits(start, bool(resume_from))
        # Outputs checked (and created, and locked) once every input passed its checks: before
        # any work, not at the first save hours later, and nothing left behind by bad input.
        agreed(self._claim_outputs)
        p = cfg.parallel
        ps.initialize_model_parallel(
            tensor_model_parallel_size=p.tensor,
            pipeline_model_parallel_size=p.pipeline,
            virtual_pipeline_model_parallel_size=p.virtual_pipeline,
        )
        self.dp_size = ps.get_data_parallel_world_size()
        self.dp_rank = ps.get_data_parallel_rank()
        self.num_microbatches = cfg.train.global_batch_size // (
            cfg.train.micro_batch_size * self.dp_size
        )
        self._seed(cfg.train.seed)

        self.tconfig = transformer_config(cfg, self.device_type)
        self.is_pn = cfg.model.type == "pn"
        # PN: the cluster of each blend entry (a sample's `dataset_id` indexes it).
        self.cluster_table = (
            torch.tensor(resolve_blend(cfg.data).cluster_ids) if self.is_pn else None
        )
        self.teacher = (build_teacher(cfg, self.device_type)
                        if cfg.distill.teacher else None)
        self.engine = ENGINES[cfg.engine](cfg, self.tconfig, self._initial_model(resume_from),
                                          self.is_pn)
        self.scheduler = self._build_scheduler(self.engine.optimizer)
        if hasattr(self.engine, "parameter_elements"):
            held, total = self.engine.parameter_elements()
            self._print(f"deepspeed ZeRO-{cfg.deepspeed.zero_stage}: rank 0 holds {held:,} of "
                        f"{total:,} parameter elements")
        if resume_from:
            self._resume(resume_from)

        run_dir = Path(cfg.logging.run_dir)
        self.train_data, self.valid_data = build_datasets(
            cfg, cfg.data.cache_dir or str(run_dir / "index_cache")
        )
        self.eval_sets = held_out_sets(cfg)
        self.eval_eod = token_ids(cfg.data, cfg.model.vocab_size).eod if self.eval_sets else None
        self.is_logging_rank = self.env.rank == self.env.world_size - 1
        self.metrics = MetricsLogger(
            str(run_dir), self.is_logging_rank, cfg.to_dict(), cfg.logging.tensorboard,
            cfg.logging.wandb_mode, cfg.logging.wandb_project,
        )

    # -- set-up ---------------------------------------------------------------------------------

    def _seed(self, seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        tensor_parallel.model_parallel_cuda_manual_seed(seed)

    def _claim_outputs(self) -> None:
        """Every output directory can be written (an existing file in its place fails here), and
        rank 0 locks checkpoint.dir for the life of the run: a second run on it is refused."""
        cfg = self.cfg
        if cfg.checkpoint.dir:
            check_writable_dir(cfg.checkpoint.dir, "checkpoint.dir")
            if self.env.rank == 0:
                self.lock = checkpoint.DirLock(cfg.checkpoint.dir)
                warning = self.lock.acquire()
                if warning:
                    self._warn(warning)
        for key, path in (("logging.run_dir", cfg.logging.run_dir),
                          ("data.cache_dir", cfg.data.cache_dir)):
            if path:
                check_writable_dir(path, key)

    def close(self) -> None:
        """Release checkpoint.dir (the process ending releases it too, however it ends) and
        give the stop signals their previous handlers back."""
        if self.lock is not None:
            self.lock.release()
        for sig, handler in self.previous_handlers.items():
            signal.signal(sig, handler)

    def _intact_step(self) -> int | None:
        ckpt = self.cfg.checkpoint
        step, warning = checkpoint.resume_step(ckpt.dir, ckpt.on_damaged)
        if warning:
            self._warn(warning)
        return step

    def _checkpoint_to_resume(self) -> Path | None:
        """The latest intact checkpoint in checkpoint.dir, if it holds a training state to
        resume."""
        ckpt = self.cfg.checkpoint
        step = agreed(self._intact_step) if ckpt.dir else None
        if step is None:
            return None
        path = checkpoint.iteration_dir(ckpt.dir, step)
        if checkpoint.has_training_state(path):
            return path
        self._print(f"{path} holds model weights only: starting from them at step 0")
        self.initial_weights = path
        return None

    def _initial_model(self, resume_from) -> list:
        """Model chunks on the device; weights from checkpoint.load (or a model-only checkpoint
        in checkpoint.dir) unless resuming."""
        chunks = build_model(self.cfg, self.device_type, tconfig=self.tconfig)
        path = self._weights_to_load()
        if path and not resume_from:
            reason = checkpoint.damage(path)
            if reason:
                raise self._refusal(path, False, reason, "restore it, or name another checkpoint")
            try:
                checkpoint.load(path, chunks)
            except (Exception, checkpoint.CheckpointException) as err:
                raise self._refusal(path, False, self._why_not_loaded(path, err)[0], (
                    "use the model config it was saved with, or another checkpoint")) from err
            self._print(f"initialized model weights from {path}")
        return chunks

    def _check_model_fits(self, path: Path | None, resuming: bool) -> None:
        """A checkpoint of another model shape is refused before any work (the config it
        stores says so; what a load would fail on later, after the outputs exist)."""
        differences = checkpoint.shape_differences(path, self.cfg.model) if path else []
        if differences:
            raise self._refusal(path, resuming, f"another model ({'; '.join(differences)})",
                                "use the model config it was saved with, or another checkpoint")

    def _refusal(self, path: Path, resuming: bool, why: str,
                 advice: str) -> checkpoint.CheckpointError:
        """One form for every checkpoint this run cannot start from: which one, why, the key
        that named it (checkpoint.dir when resuming or starting from weights found there)."""
        key = "checkpoint.dir" if resuming or self.initial_weights else "checkpoint.load"
        what = "resume from" if resuming else "initialize the model from"
        return checkpoint.CheckpointError(f"cannot {what} {path}: {why} ({key}) — {advice}")

    def _why_not_loaded(self, path: Path, err: BaseException) -> tuple[str, bool]:
        """Why a load failed, and whether it is because the checkpoint holds another model."""
        differences = checkpoint.model_differences(path, self.cfg.model)
        if differences:
            return f"another model ({'; '.join(differences)})", True
        return checkpoint.why_failed(err), False

    def _weights_to_load(self) -> Path | None:
        """A model-only checkpoint in checkpoint.dir, else checkpoint.load (when not resuming)."""
        load = self.cfg.checkpoint.load
        return self.initial_weights or (checkpoint.resolve(load) if load else None)

    def _build_scheduler(self, optimizer) -> OptimizerParamScheduler:
        t = self.cfg.train
        return OptimizerParamScheduler(
            optimizer,
            init_lr=0.0,
            max_lr=t.lr,
            min_lr=t.min_lr,
            lr_warmup_steps=t.warmup_steps,
            # (a run of 0 steps only writes its initial checkpoint; keep the schedule valid)
            lr_decay_steps=t.decay_steps or max(t.steps, t.warmup_steps + 1),
            lr_decay_style=t.decay_style,
            start_wd=t.weight_decay,
            end_wd=t.weight_decay,
            wd_incr_steps=max(t.steps, 1),
            wd_incr_style="constant",
        )

    def _resume(self, path: Path) -> None:
        try:
            common = self.engine.load(path, self.scheduler)
        except (Exception, checkpoint.CheckpointException) as err:
            why, other_model = self._why_not_loaded(path, err)
            raise self._refusal(path, True, why, (
                "resume with the model config it was saved with, or give this model another "
                "checkpoint.dir") if other_model else (
                f"delete {path.name} to resume from an earlier iteration, or move "
                "checkpoint.dir away to start from step 0")) from err
        self.step = common["iteration"]
        self.early_stopping.update(common.get("early_stopping", {}))
        self._print(f"resumed from {path} at step {self.step}")

    # -- one step -------------------------------------------------------------------------------

    def _forward_step(self, data_iterator, model):
        batch, routing = next(data_iterator), {}
        if self.is_pn:  # PN: the expert of each row, on the host (the model groups the rows)
            routing["cluster_ids"] = cluster_ids_of(batch, self.cluster_table)
        batch = {k: v.to(self.env.device, non_blocking=True) for k, v in batch.items()}
        inputs = (batch["tokens"], batch["position_ids"], None)
        if self.teacher is not None and model.training:  # SLM-d (validation: plain loss)
            with torch.no_grad():
                teacher_logits = self.teacher(*inputs)
            d = self.cfg.distill
            output = distillation_loss(model(*inputs, **routing), teacher_logits,
                                       batch["labels"], d.weight, d.temperature)
        else:
            output = model(*inputs, labels=batch["labels"], **routing)
        return output, partial(_token_loss, batch["loss_mask"])

    def train_step(self, batches: list[dict]) -> tuple[float | None, float]:
        experts = set(torch.cat([cluster_ids_of(b, self.cluster_table) for b in batches]).tolist()
                      ) if self.is_pn else ()
        reports, grad_norm = self.engine.train_step(self._forward_step, batches, self.scheduler,
                                                    experts)
        return _mean_loss(reports, self.env.device), grad_norm

    @torch.no_grad()
    def evaluate(self) -> float | None:
        if self.valid_data is None:
            return None
        t = self.cfg.train
        # The same eval_steps global batches every time: comparable across steps and layouts.
        sampler = StepSampler(0, t.eval_steps, t.global_batch_size, t.micro_batch_size,
                              self.dp_rank, self.dp_size)
        batches = list(micro_batch_loader(self.valid_data, sampler, 0, False))
        self.engine.set_training(False)
        with projected_once(self.engine.model, backprop=False):  # PN: each expert once
            losses = self.engine.run_microbatches(self._forward_step, batches, forward_only=True)
        self.engine.set_training(True)
        # Known on the last pipeline stage; every rank needs it (early stopping is collective).
        loss = torch.tensor([_mean_loss(losses, self.env.device) or 0.0], device=self.env.device)
        dist.broadcast(loss, src=self.env.world_size - 1)
        return loss.item()

    @torch.no_grad()
    def evaluate_sets(self) -> dict[str, dict]:
        """train.eval_sets, each as pn-eval evaluates it (PN: with the set's expert)."""
        if not self.eval_sets:
            return {}
        loaded = SimpleNamespace(model=self.engine.model[0], device=self.env.device)
        self.engine.set_training(False)
        results = {held.name: evaluate_set(loaded, held, self.eval_eod,
                                           self.cfg.train.micro_batch_size)
                   for held in self.eval_sets}
        self.engine.set_training(True)
        return results

    # -- the loop -------------------------------------------------------------------------------

    def _request_stop(self, signum, frame) -> None:
        self._stop_requested = True

    def _stop_agreed(self) -> bool:
        """A signal may reach only some ranks: agree at the step boundary (any rank -> all).
        Running out of `exit_duration_minutes` counts as a stop request too."""
        limit = self.cfg.train.exit_duration_minutes
        out_of_time = limit is not None and time.time() - self.start_time > 60 * limit
        flag = torch.tensor([float(self._stop_requested or out_of_time)], device=self.env.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _cluster_of_each_sample(self):
        """For data.group_by_cluster: the cluster of every training sample index."""
        positions = getattr(self.train_data, "dataset_index", None)  # a BlendedDataset's
        if not (self.is_pn and self.cfg.data.group_by_cluster and positions is not None):
            return None
        return self.cluster_table.numpy()[positions]

    def _batches_by_step(self):
        t = self.cfg.train
        sampler = StepSampler(self.step, t.steps, t.global_batch_size, t.micro_batch_size,
                              self.dp_rank, self.dp_size, self._cluster_of_each_sample())
        workers = compat.data_workers(self.cfg.data.num_workers, self.device_type)
        loader = micro_batch_loader(self.train_data, sampler, workers, self.device_type == "cuda",
                                    ahead=self.num_microbatches)
        micro = iter(loader)
        while True:
            yield [next(micro) for _ in range(self.num_microbatches)]

    def train(self) -> int:
        """Returns the step reached. checkpoint.dir is released at the end, however it ends."""
        try:
            return self._train()
        finally:
            self.close()

    def _train(self) -> int:
        t, ckpt = self.cfg.train, self.cfg.checkpoint
        tokens_per_step = t.global_batch_size * self.cfg.model.seq_length
        peak = device_peak_tflops(self.cfg.logging.peak_tflops)
        stop_at = t.steps if t.exit_after_steps is None else min(t.steps, self.step + t.exit_after_steps)
        first_step, batches = self.step, self._batches_by_step()
        self._print(f"training steps {self.step} -> {stop_at} of {t.steps}")
        if self.cfg.logging.progress_bar:
            self.metrics.start_progress(self.step, stop_at)
        if self._fine_tuning_from_start():
            self._starting_model_as_candidate()
        interrupted = early_stopped = False
        while self.step < stop_at and not (interrupted or early_stopped):
            start = time.perf_counter()
            loss, grad_norm = self.train_step(next(batches))
            self.step += 1
            elapsed = time.perf_counter() - start
            self.metrics.advance(loss)
            if self.step % t.log_interval == 0 or self.step == stop_at:
                self._log_train(loss, grad_norm, tokens_per_step / elapsed, peak)
            improved = bool(t.eval_interval) and self.step % t.eval_interval == 0 and self._validate()
            interrupted = self._stop_agreed()
            periodic = ckpt.save_interval and self.step % ckpt.save_interval == 0
            if ckpt.dir and (interrupted or periodic or (improved and ckpt.keep_best)):
                self.save()
            if ckpt.dir and improved and ckpt.keep_best:
                checkpoint.mark_best(ckpt.dir, self.step)
            early_stopped = self._patience_exhausted()
        if interrupted:
            self._print(f"stop requested (signal or time limit): saved step {self.step}, "
                        "exiting; a rerun resumes here")
        else:
            if early_stopped:
                self._print(f"early stopping at step {self.step}: no validation improvement in "
                            f"{t.early_stopping_patience} evaluations (best "
                            f"{self.early_stopping['best']:.4f})")
            improved = False
            if t.eval_interval and (self.step == 0 or self.step % t.eval_interval):
                improved = self._validate()  # the final model is always evaluated
            saved = checkpoint.newest_intact(ckpt.dir)[0] if ckpt.dir else None
            if ckpt.dir and ckpt.save_at_end and saved != self.step:
                self.save()
            if ckpt.dir and improved and ckpt.keep_best and ckpt.save_at_end:
                checkpoint.mark_best(ckpt.dir, self.step)
        self._record_cost(first_step, tokens_per_step)
        if early_stopped or self.step >= t.steps:
            self._mark_finished("early stopping" if early_stopped else "train.steps")
        self.metrics.close()
        return self.step

    def save(self) -> Path:
        ckpt = self.cfg.checkpoint
        extra = {
            "consumed_samples": self.step * self.cfg.train.global_batch_size,
            "config": self.cfg.to_dict(),
            "early_stopping": dict(self.early_stopping),
            "tokenizer": self.tokenizer.record() if self.tokenizer else None,
        }
        path = self.engine.save(ckpt.dir, self.step, self.scheduler, extra)
        self._print(f"saved checkpoint {path}")
        return path

    # -- validation, early stopping, cost -------------------------------------------------------

    def _validate(self) -> bool:
        """Evaluate and log; True when the validation loss is the best so far."""
        for name, result in self.evaluate_sets().items():
            self.metrics.log(self.step, {"loss": result["nll"], "ppl": result["ppl"],
                                         "tokens": result["tokens"]}, f"eval/{name}")
        loss = self.evaluate()
        if loss is None:
            return False
        self.metrics.log(self.step, {"loss": loss, "ppl": float(np.exp(min(loss, 50)))}, "valid")
        if loss < self.early_stopping["best"]:
            self.early_stopping.update(best=loss, best_step=self.step, evals_since_best=0)
            return True
        self.early_stopping["evals_since_best"] += 1
        return False

    def _fine_tuning_from_start(self) -> bool:
        """Step 0 of a run from loaded weights that picks checkpoints by validation loss."""
        t = self.cfg.train
        compares = t.early_stopping_patience is not None or self.cfg.checkpoint.keep_best
        return (self.step == 0 and self.early_stopping["best_step"] is None and compares
                and bool(t.eval_interval) and self._weights_to_load() is not None)

    def _starting_model_as_candidate(self) -> None:
        """The loaded model is the first candidate of early stopping and keep_best: fine-tuning
        on a small set can make every checkpoint worse on validation than no fine-tuning at all
        (docs/RESULTS.md), and then the run keeps the model it started from."""
        ckpt = self.cfg.checkpoint
        if self._validate() and ckpt.dir and ckpt.keep_best:
            self.save()
            checkpoint.mark_best(ckpt.dir, self.step)

    def _patience_exhausted(self) -> bool:
        patience = self.cfg.train.early_stopping_patience
        return patience is not None and self.early_stopping["evals_since_best"] >= patience

    def _record_cost(self, first_step: int, tokens_per_step: int) -> None:
        """Add this invocation's wall time x devices to run_dir/cost.json (the cost log), and
        the CPU seconds of all its processes (on a shared CPU machine, the measure that does not
        depend on what else runs)."""
        cpu = torch.tensor([time.process_time() - self.start_cpu], dtype=torch.float64,
                           device=self.env.device)
        dist.all_reduce(cpu)
        if not self.is_logging_rank:
            return
        path = Path(self.cfg.logging.run_dir) / COST
        log = json.loads(path.read_text()) if path.is_file() else {"runs": []}
        wall = time.time() - self.start_time
        log["runs"].append({
            "phase": self.cfg.logging.phase, "device": device_description(),
            "devices": self.env.world_size, "wall_seconds": wall, "cpu_seconds": cpu.item(),
            "device_hours": wall * self.env.world_size / 3600,
            "steps": self.step - first_step, "tokens": (self.step - first_step) * tokens_per_step,
        })
        log["total_device_hours"] = sum(r["device_hours"] for r in log["runs"])
        log["total_tokens"] = sum(r["tokens"] for r in log["runs"])
        atomic_write_json(path, log)

    def _mark_finished(self, reason: str) -> None:
        """run_dir/finished.json: the run is over (pipelines wait on this file; a killed or
        stopped run has none, so its rerun resumes)."""
        if self.is_logging_rank:
            atomic_write_json(Path(self.cfg.logging.run_dir) / FINISHED,
                              {"step": self.step, "reason": reason,
                               "best_step": self.early_stopping["best_step"]})

    def _log_train(self, loss, grad_norm, tokens_per_s, peak) -> None:
        values = {"loss": loss, "lr": self.scheduler.get_lr(self.engine.optimizer.param_groups[0]),
                  "grad_norm": grad_norm, "tokens_per_s": tokens_per_s}
        if peak:
            achieved = flops_per_token(self.cfg) * tokens_per_s / self.env.world_size
            values["mfu"] = achieved / (peak * 1e12)
        self.metrics.log(self.step, {**values, **peak_memory()}, "train")

    def _print(self, message: str) -> None:
        if self.env.rank == 0:
            print(message, flush=True)

    def _warn(self, message: str) -> None:
        """What the run will do that a user may not mean: one line on stderr."""
        if self.env.rank == 0:
            print(f"pn-train: warning: {message}", file=sys.stderr, flush=True)


def held_out_sets(cfg: Config) -> list:
    """train.eval_sets as pn-eval's windows (every token predicted once, at most
    train.eval_sets_max_tokens), routed to the set's expert or each window's cluster (PN); an
    SLM-mix expert keeps the windows of its own cluster."""
    from megatron_pn.evaluate import HeldOut, document_windows, open_dataset, window_clusters

    sets = []
    for name, prefix, *route in cfg.train.eval_sets:
        dataset = open_dataset(prefix)
        windows = document_windows(dataset.sequence_lengths, cfg.model.seq_length,
                                   cfg.train.eval_sets_max_tokens)
        held = HeldOut(name, prefix, dataset, windows)
        if route and cfg.model.type == "mix":
            held.windows = windows[window_clusters(route[0], held) == cfg.data.expert]
        elif route and isinstance(route[0], str):  # each window by its cluster (pn-data assign)
            held.cluster_ids = window_clusters(route[0], held)
        elif route:
            held.cluster_ids = np.full(len(windows), route[0], dtype=np.int64)
        sets.append(held)
    return sets


def finetuning_lr(cfg: Config) -> Config:
    """train.lr_factor_of_loaded: lr and min_lr scaled from the run that wrote checkpoint.load
    (the paper fine-tunes at the pretraining lr / 3)."""
    factor, source = cfg.train.lr_factor_of_loaded, cfg.checkpoint.load
    if factor is None or not source:
        return cfg
    base = checkpoint.saved_config(source).train
    train = dataclasses.replace(cfg.train, lr=base.lr * factor, min_lr=base.min_lr * factor)
    return dataclasses.replace(cfg, train=train)


def _token_loss(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """Sum of masked token losses and their count; megatron-core normalizes by the global count."""
    mask = loss_mask.view(-1).float()
    loss_sum = torch.sum(per_token_loss.view(-1).float() * mask)
    count = mask.sum().to(torch.int)
    return loss_sum, count, {"lm loss": torch.stack([loss_sum.detach(), mask.sum()])}


def _mean_loss(losses: list[dict], device) -> float | None:
    """Global mean token loss over micro-batches and DP ranks (None off the last stage)."""
    if not ps.is_pipeline_last_stage(ignore_virtual=True):
        return None
    total = torch.stack([entry["lm loss"] for entry in losses]).sum(dim=0).to(device)
    dist.all_reduce(total, group=ps.get_data_parallel_group())
    return (total[0] / total[1]).item()
