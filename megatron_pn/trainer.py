"""The training loop on megatron-core: TP x PP x DP, DDP, (distributed) optimizer, pipeline
schedules, dist-checkpointing, validation and logging. One code path for CPU and GPU.

    trainer = Trainer(cfg)   # process groups, model, optimizer, data, resume
    trainer.train()          # until train.steps, a stop signal, or exit_after_steps

The loop is here; its components are beside it, each one job: the model's family
(megatron_pn.families: routing, step scope), the engine and LR schedule (engines.py), where the
run starts (training/start.py), its validation (training/validation.py), which checkpoint it
keeps (training/selection.py), its cost log (training/cost_log.py).
"""

from __future__ import annotations

import random
import signal
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel

from megatron_pn import checkpoint, compat
from megatron_pn.checks import check_config
from megatron_pn.clustering import run_clustering
from megatron_pn.config import Config
from megatron_pn.data import StepSampler, build_datasets, micro_batch_loader
from megatron_pn.distributed import agreed, init_distributed
from megatron_pn.training.heartbeat import Heartbeat
from megatron_pn.distill import build_teacher, distillation_loss
from megatron_pn.engines import ENGINES, lr_scheduler
from megatron_pn.evaluate import perplexity
from megatron_pn.families import family_of
from megatron_pn.metrics import MetricsLogger, device_peak_tflops, peak_memory
from megatron_pn.mixture import mixture_sampling
from megatron_pn.model import build_model, flops_per_token, transformer_config
from megatron_pn.preflight import check_writable_dir
from megatron_pn.run_tokenizer import run_tokenizer
from megatron_pn.training.cost_log import CostRecorder
from megatron_pn.training.selection import Selection
from megatron_pn.training.start import adapter_base, finetuning_lr, resolve_start
from megatron_pn.training.validation import Validation, mean_loss, token_loss
from pn_base.fileio import atomic_write_json
from pn_base.outputs import FINISHED

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Trainer:
    def __init__(self, cfg: Config):
        self.lock = None  # rank 0's lock on checkpoint.dir, held until train() ends
        self.heartbeat = None  # ends the process when a peer goes silent (multi-process runs)
        # the stop handlers are ours until train() ends (in-process callers get theirs back)
        self.previous_handlers = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
        try:
            self._start(cfg)
        except BaseException:
            self.close()
            raise

    def _start(self, cfg: Config) -> None:
        self.cost = CostRecorder()
        # Handlers first: a stop signal during the (minutes-long) start-up must not kill us.
        self._stop_requested = False
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._request_stop)
        self.device_type = compat.activate()
        self.env = init_distributed(self.device_type)
        self.heartbeat = Heartbeat.start_if_distributed(cfg.train.heartbeat_timeout)
        warnings = check_config(cfg, self.env.world_size, self.device_type)
        self.family = family_of(cfg)
        cfg = self.family.job_config(cfg)  # SLM-mix: this job's cluster and directories
        self.cfg = cfg = finetuning_lr(cfg)
        for warning in warnings:
            self._warn(warning)
        self.step = 0
        self.selection = Selection(cfg)
        self.start = resolve_start(cfg, self._print, self._warn)
        # Data, the checkpoint started from and the teacher: one tokenizer (before any work).
        self.tokenizer = run_tokenizer(cfg, self.start.path)
        self.start.check_model_fits(cfg.model)
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
        self.routing_table = self.family.routing_table(cfg)  # PN: each blend entry's cluster
        self.teacher = (build_teacher(cfg, self.device_type)
                        if cfg.distill.teacher else None)
        chunks = build_model(cfg, self.device_type, tconfig=self.tconfig)
        if self.start.load_weights(chunks, cfg.model):
            self._print(f"initialized model weights from {self.start.weights}")
        self.engine = ENGINES[cfg.engine](cfg, self.tconfig, chunks)
        self.scheduler = lr_scheduler(self.engine.optimizer, cfg.train)
        if hasattr(self.engine, "parameter_elements"):
            held, total = self.engine.parameter_elements()
            self._print(f"deepspeed ZeRO-{cfg.deepspeed.zero_stage}: rank 0 holds {held:,} of "
                        f"{total:,} parameter elements")
        note = self.family.compute_note(cfg, self.engine.late_gradients, self.device_type,
                                        self.tconfig.params_dtype)
        if note:
            self._print(note)
        if self.start.resume:
            common = self.start.resume_into(self.engine, self.scheduler, cfg.model)
            self.step = common["iteration"]
            self.selection.load_state_dict(common.get("early_stopping", {}))
            self._print(f"resumed from {self.start.resume} at step {self.step}")
        self.lora_base = adapter_base(cfg, self.start)  # LoRA: the base its checkpoints adapt

        run_dir = Path(cfg.logging.run_dir)
        self.train_data = build_datasets(cfg, cfg.data.cache_dir or str(run_dir / "index_cache"))
        self.validation = Validation(cfg, self.dp_rank, self.dp_size, self.env)
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
        if self.heartbeat is not None:
            self.heartbeat.stop()
        if self.lock is not None:
            self.lock.release()
        for sig, handler in self.previous_handlers.items():
            signal.signal(sig, handler)

    # -- one step -------------------------------------------------------------------------------

    def _forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        routing = self.family.batch_routing(batch, self.routing_table)  # PN: each row's expert
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
        return output, partial(token_loss, batch["loss_mask"])

    def train_step(self, batches: list[dict]) -> tuple[float | None, float]:
        experts = self.family.step_experts(batches, self.routing_table)
        reports, grad_norm = self.engine.train_step(self._forward_step, batches, self.scheduler,
                                                    experts)
        return mean_loss(reports, self.env.device), grad_norm

    # -- the loop -------------------------------------------------------------------------------

    def _request_stop(self, signum, frame) -> None:
        self._stop_requested = True

    def _stop_agreed(self) -> bool:
        """A signal may reach only some ranks: agree at the step boundary (any rank -> all).
        Running out of `exit_duration_minutes` counts as a stop request too."""
        limit = self.cfg.train.exit_duration_minutes
        out_of_time = limit is not None and self.cost.wall_seconds() > 60 * limit
        flag = torch.tensor([float(self._stop_requested or out_of_time)], device=self.env.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _cluster_of_each_sample(self):
        """For data.group_by_cluster: the cluster of every training sample index."""
        positions = getattr(self.train_data, "dataset_index", None)  # a BlendedDataset's
        if not (self.routing_table is not None and self.cfg.data.group_by_cluster
                and positions is not None):
            return None
        return self.routing_table.numpy()[positions]

    def _batches_by_step(self):
        t = self.cfg.train
        if self.cfg.data.mixture == "none":
            dataset = self.train_data
            sampler = StepSampler(self.step, t.steps, t.global_batch_size, t.micro_batch_size,
                                  self.dp_rank, self.dp_size, self._cluster_of_each_sample())
        else:  # mixture training: each step or micro-batch its mixture of the clusters
            dataset, sampler = mixture_sampling(self.cfg, self.train_data, self.step,
                                                self.dp_rank, self.dp_size)
        workers = compat.data_workers(self.cfg.data.num_workers, self.device_type)
        loader = micro_batch_loader(dataset, sampler, workers, self.device_type == "cuda",
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
        if self.selection.starting_model_is_candidate(self.step, self.start.weights is not None):
            self._checkpoint(save=False, keep=self._validate() and self.selection.keep_best)
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
            self._checkpoint(save=interrupted or periodic,
                             keep=improved and self.selection.keep_best)
            early_stopped = self.selection.patience_exhausted()
        if interrupted:
            self._print(f"stop requested (signal or time limit): saved step {self.step}, "
                        "exiting; a rerun resumes here")
        else:
            if early_stopped:
                self._print(f"early stopping at step {self.step}: no validation gain beyond "
                            f"train.selection_margin in {t.early_stopping_patience} evaluations "
                            f"(best {self.selection.best:.4f} at step {self.selection.best_step})")
            improved = False
            # The final model is always evaluated; a pause (train.exit_after_steps) is not the
            # end: evaluating there would change what the selection keeps after the resume.
            over = self.step >= t.steps
            if t.eval_interval and over and (self.step == 0 or self.step % t.eval_interval):
                improved = self._validate()
            saved = bool(ckpt.dir) and checkpoint.newest_intact(ckpt.dir)[0] == self.step
            self._checkpoint(save=ckpt.save_at_end, saved=saved,
                             keep=improved and self.selection.keep_best and ckpt.save_at_end)
        self.cost.record(self.cfg.logging.run_dir, self.cfg.logging.phase, self.env,
                         self.step - first_step, (self.step - first_step) * tokens_per_step,
                         writes=self.is_logging_rank)
        if early_stopped or self.step >= t.steps:
            self._mark_finished("early stopping" if early_stopped else "train.steps")
        self.metrics.close()
        return self.step

    def save(self) -> Path:
        ckpt = self.cfg.checkpoint
        extra = {
            "consumed_samples": self.step * self.cfg.train.global_batch_size,
            "config": self.cfg.to_dict(),
            "early_stopping": self.selection.state_dict(),
            "tokenizer": self.tokenizer.record() if self.tokenizer else None,
            "clustering": run_clustering(self.cfg),  # pn-project checks histograms against it
        }
        if self.lora_base is not None:
            extra[checkpoint.BASE_KEY] = self.lora_base
        path = self.engine.save(ckpt.dir, self.step, self.scheduler, extra)
        self._print(f"saved checkpoint {path}")
        return path

    def _checkpoint(self, save: bool, keep: bool, saved: bool = False) -> None:
        """Save this step when asked (unless it is `saved` already) or when it is a new best
        the selection keeps, then marked best (tools reading checkpoint.dir take that one)."""
        ckpt = self.cfg.checkpoint
        if not ckpt.dir:
            return
        if (save or keep) and not saved:
            self.save()
        if keep:
            checkpoint.mark_best(ckpt.dir, self.step)

    def _validate(self) -> bool:
        """Evaluate and log; True when the validation loss replaces the best so far."""
        for name, result in self.validation.held_out(self.engine, self._forward_step).items():
            self.metrics.log(self.step, {"loss": result["nll"], "ppl": result["ppl"],
                                         "stderr": result["stderr"], "tokens": result["tokens"]},
                             f"eval/{name}")
        scores = self.validation.scores(self.engine, self._forward_step)
        if scores is not None:
            self.metrics.log(self.step, {"loss": scores.nll, "ppl": perplexity(scores.nll),
                                         "stderr": scores.stderr,
                                         "tokens": int(scores.sizes.sum())}, "valid")
        return self.selection.observe(self.step, scores)

    def _mark_finished(self, reason: str) -> None:
        """run_dir/finished.json: the run is over (pipelines wait on this file; a killed or
        stopped run has none, so its rerun resumes)."""
        if self.is_logging_rank:
            atomic_write_json(Path(self.cfg.logging.run_dir) / FINISHED,
                              {"step": self.step, "reason": reason,
                               "best_step": self.selection.best_step})

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
