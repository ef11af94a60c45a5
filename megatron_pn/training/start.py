"""Where a run starts (the Trainer's start-point resolver).

    resume    checkpoint.dir's newest intact iteration holding a training state (model,
              optimizer, scheduler, RNG, data position): the run goes on from its step
    weights   model weights only, at step 0: a weights-only iteration in checkpoint.dir (a
              projected expert, an imported model) or checkpoint.load (fine-tuning), whose
              run's LR it scales by train.lr_factor_of_loaded
    scratch   neither

A checkpoint the run cannot start from (damaged, another model, a load that fails) is refused in
one form: which one, why, the key that named it, what to do.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from megatron_pn import checkpoint
from megatron_pn.config import Config
from megatron_pn.distributed import agreed

OTHER_MODEL_ADVICE = "use the model config it was saved with, or another checkpoint"


@dataclass
class StartPoint:
    resume: Path | None = None  # a training state to go on from
    weights: Path | None = None  # model weights to start from at step 0 (when not resuming)
    weights_in_dir: bool = False  # those weights are checkpoint.dir's, not checkpoint.load's

    @property
    def path(self) -> Path | None:
        """The checkpoint the run starts from (its tokenizer and model must match)."""
        return self.resume or self.weights

    def refusal(self, path: Path, why: str, advice: str) -> checkpoint.CheckpointError:
        key = "checkpoint.dir" if self.resume or self.weights_in_dir else "checkpoint.load"
        what = "resume from" if self.resume else "initialize the model from"
        return checkpoint.CheckpointError(f"cannot {what} {path}: {why} ({key}) — {advice}")

    def check_model_fits(self, model) -> None:
        """A checkpoint of another model shape is refused before any work (the config it stores
        says so), not by a load that fails after the outputs exist."""
        differences = checkpoint.shape_differences(self.path, model) if self.path else []
        if differences:
            raise self.refusal(self.path, f"another model ({'; '.join(differences)})",
                               OTHER_MODEL_ADVICE)

    def load_weights(self, chunks: list, model) -> bool:
        """Fill the model chunks from `weights` (not when resuming); True when it did."""
        if self.resume or not self.weights:
            return False
        reason = checkpoint.damage(self.weights)
        if reason:
            raise self.refusal(self.weights, reason, "restore it, or name another checkpoint")
        try:
            checkpoint.load(self.weights, chunks)
        except (Exception, checkpoint.CheckpointException) as err:
            raise self.refusal(self.weights, why_not_loaded(self.weights, model, err)[0],
                               OTHER_MODEL_ADVICE) from err
        return True

    def resume_into(self, engine, scheduler, model) -> dict:
        """The training state loaded into the engine and scheduler; its common state."""
        try:
            return engine.load(self.resume, scheduler)
        except (Exception, checkpoint.CheckpointException) as err:
            why, other_model = why_not_loaded(self.resume, model, err)
            raise self.refusal(self.resume, why, (
                "resume with the model config it was saved with, or give this model another "
                "checkpoint.dir") if other_model else (
                f"delete {self.resume.name} to resume from an earlier iteration, or move "
                "checkpoint.dir away to start from step 0")) from err


def why_not_loaded(path: Path, model, err: BaseException) -> tuple[str, bool]:
    """Why a load failed, and whether it is because the checkpoint holds another model."""
    differences = checkpoint.model_differences(path, model)
    if differences:
        return f"another model ({'; '.join(differences)})", True
    return checkpoint.why_failed(err), False


def resolve_start(cfg: Config, say: Callable[[str], None],
                  warn: Callable[[str], None]) -> StartPoint:
    """Every rank's start point (collective: the ranks agree on checkpoint.dir's state)."""
    ckpt = cfg.checkpoint

    def intact_step() -> int | None:
        step, warning = checkpoint.resume_step(ckpt.dir, ckpt.on_damaged)
        if warning:
            warn(warning)
        return step

    step = agreed(intact_step) if ckpt.dir else None
    loaded = checkpoint.resolve(ckpt.load) if ckpt.load else None
    if step is None:
        return StartPoint(weights=loaded)
    path = checkpoint.iteration_dir(ckpt.dir, step)
    if checkpoint.has_training_state(path):
        return StartPoint(resume=path, weights=loaded)
    say(f"{path} holds model weights only: starting from them at step 0")
    return StartPoint(weights=path, weights_in_dir=True)


def adapter_base(cfg: Config, start: StartPoint) -> dict | None:
    """finetune.lora: the frozen base every adapter checkpoint of the run names — the one the
    adapter checkpoint it starts from names, else the checkpoint its weights come from."""
    if cfg.finetune.lora.rank is None:
        return None
    from megatron.core import dist_checkpointing

    from megatron_pn.lora import base_record

    common = dist_checkpointing.load_common_state_dict(str(start.path))
    return common.get(checkpoint.BASE_KEY) or base_record(start.path)


def finetuning_lr(cfg: Config) -> Config:
    """train.lr_factor_of_loaded: lr and min_lr scaled from the run that wrote checkpoint.load
    (the paper fine-tunes at the pretraining lr / 3)."""
    factor, source = cfg.train.lr_factor_of_loaded, cfg.checkpoint.load
    if factor is None or not source:
        return cfg
    base = checkpoint.saved_config(source).train
    train = dataclasses.replace(cfg.train, lr=base.lr * factor, min_lr=base.min_lr * factor)
    return dataclasses.replace(cfg, train=train)
