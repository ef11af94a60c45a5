"""Training engines behind one interface, chosen by `engine:` in the config.

megatron (default)  megatron-core DDP, its (distributed) optimizer, pipeline schedules and
                    dist_checkpointing.
deepspeed           DeepSpeed ZeRO stage 1/2/3 (optional CPU offload), megatron-core's parallel
                    state as the mpu so tensor parallelism keeps working; PP = 1.

Both take the model chunks built by `model.build_model_chunks`, run the trainer's forward step
(same data, same per-token loss), expose `optimizer.param_groups` to megatron-core's LR
scheduler (same schedule) and save to `checkpoint.dir/iter_NNNNNNN` with the same atomic
`latest` marker (same resume semantics).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel as DDP
from megatron.core.distributed import DistributedDataParallelConfig
from megatron.core.optimizer import (OptimizerConfig, ParamKey, get_megatron_optimizer,
                                     get_standard_config_overrides)
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_pn import checkpoint
from megatron_pn.config import Config
from megatron_pn.families import family_of
from pn_base.errors import ConfigError
from pn_base.fileio import atomic_write_json, atomic_write_text
from pn_base.tokenizer_identity import DEEPSPEED_TOKENIZER


def use_fused_adam(optimizer) -> None:
    """Switch megatron-core's torch AdamW to torch's fused kernel (the same update).

    Without Transformer Engine or apex, megatron-core builds torch's AdamW with its default
    implementation: a loop over tensors on CPU, `foreach` on CUDA. The fused kernel makes one
    pass over each tensor: 9x faster on a 2-core CPU for 48M parameters - most of a projected
    network's optimizer cost, whose banks hold h copies of the MLP. Applied again after a
    checkpoint load, which restores the saved param groups (and `step` counters on the host,
    where the fused kernel wants them on the parameter's device).
    """
    for megatron_optimizer in getattr(optimizer, "chained_optimizers", [optimizer]):
        adam = getattr(megatron_optimizer, "optimizer", None)
        if isinstance(adam, torch.optim.Adam):  # AdamW is one; TE/apex FusedAdam are not
            adam.defaults.update(fused=True, foreach=False)
            for group in adam.param_groups:
                group.update(fused=True, foreach=False)
            for param, state in adam.state.items():
                if torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].to(param.device, torch.float32)


def lr_scheduler(optimizer, train) -> OptimizerParamScheduler:
    """megatron-core's LR/WD schedule over either engine's `optimizer.param_groups` (a group's
    own max_lr/min_lr win: family LR overrides)."""
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=train.lr,
        min_lr=train.min_lr,
        lr_warmup_steps=train.warmup_steps,
        # (a run of 0 steps only writes its initial checkpoint; keep the schedule valid)
        lr_decay_steps=train.decay_steps or max(train.steps, train.warmup_steps + 1),
        lr_decay_style=train.decay_style,
        start_wd=train.weight_decay,
        end_wd=train.weight_decay,
        wd_incr_steps=max(train.steps, 1),
        wd_incr_style="constant",
    )


class MegatronEngine:
    # a gradient may first arrive in any micro-batch of a step: DDP's buffers are zeroed per step
    late_gradients = True

    def __init__(self, cfg: Config, tconfig, chunks: list):
        self.cfg, self.tconfig = cfg, tconfig
        family = family_of(cfg)
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
            use_distributed_optimizer=cfg.parallel.distributed_optimizer,
        )
        self.model = [DDP(tconfig, ddp_config, chunk, disable_bucketing=i > 0)
                      for i, chunk in enumerate(chunks)]
        tconfig.finalize_model_grads_func = family.finalize_grads
        # PN: projected once per step
        self.step_scope = family.step_scope(cfg, self.model, self.late_gradients)
        if cfg.parallel.overlap_grad_reduce:
            no_sync = [c.no_sync for c in self.model]
            tconfig.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
        t = cfg.train
        config = OptimizerConfig(
            optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay,
            adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, adam_eps=t.adam_eps,
            clip_grad=t.clip_grad, bf16=tconfig.bf16, params_dtype=tconfig.params_dtype,
            use_distributed_optimizer=cfg.parallel.distributed_optimizer,
        )
        overrides = get_standard_config_overrides(config)  # no decay on biases and norms
        for pattern, schedule in family.lr_overrides(t).items():  # PN: the banks' own LR
            overrides[ParamKey(name=pattern)] = schedule
        self.optimizer = get_megatron_optimizer(config, self.model, overrides)
        use_fused_adam(self.optimizer)
        use_sync_free_grad_norm()
        tconfig.grad_scale_func = self.optimizer.scale_loss

    def run_microbatches(self, forward_step, batches: list[dict], forward_only: bool):
        iterators = [iter(batches) for _ in self.model]
        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iterators if len(iterators) > 1 else iterators[0],
            model=self.model, num_microbatches=len(batches),
            seq_length=self.cfg.model.seq_length,
            micro_batch_size=self.cfg.train.micro_batch_size, forward_only=forward_only,
        )

    def train_step(self, forward_step, batches, scheduler, experts=()):
        """One optimizer step; returns (per-micro-batch loss reports, grad norm). `experts`: the
        PN experts the step uses (projected once for all its micro-batches)."""
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        with self.step_scope(experts=experts, micro_batches=len(batches)):
            reports = self.run_microbatches(forward_step, batches, forward_only=False)
        scheduler.step(increment=1)  # the LR of step s is the schedule at s + 1
        _, grad_norm, _ = self.optimizer.step()
        return reports, float(grad_norm or 0.0)

    def set_training(self, training: bool) -> None:
        for chunk in self.model:
            chunk.train(training)

    def load(self, path, scheduler) -> dict:
        common = checkpoint.load(path, self.model, self.optimizer, scheduler)
        self.optimizer.reload_model_params()
        use_fused_adam(self.optimizer)
        return common

    def save(self, root, step, scheduler, extra) -> Path:
        ckpt = self.cfg.checkpoint
        return checkpoint.save(root, step, self.model, self.optimizer, scheduler, extra,
                               ckpt.optimizer_format, ckpt.keep_last)


def use_sync_free_grad_norm() -> None:
    """Without TE or apex, megatron-core's gradient-norm fallback turns every tensor's norm into
    a Python float: one host sync per tensor, hundreds per step. torch's foreach norm computes
    the same sum of squares on the device."""
    from megatron.core.optimizer import clip_grads
    from megatron.core.utils import local_multi_tensor_l2_norm

    if clip_grads.l2_norm_impl is local_multi_tensor_l2_norm:
        clip_grads.l2_norm_impl = foreach_l2_norm


def foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """megatron-core's multi_tensor_l2norm interface: (total norm as a 1-element fp32 tensor,
    None)."""
    total = torch.nn.utils.get_total_norm(tensor_lists[0], 2.0, foreach=True)
    return total.float().reshape(1), None


class _MegatronMPU:
    """megatron-core's parallel state under the names DeepSpeed's `mpu` argument expects."""

    get_model_parallel_rank = staticmethod(ps.get_tensor_model_parallel_rank)
    get_model_parallel_group = staticmethod(ps.get_tensor_model_parallel_group)
    get_model_parallel_world_size = staticmethod(ps.get_tensor_model_parallel_world_size)
    get_data_parallel_rank = staticmethod(ps.get_data_parallel_rank)
    get_data_parallel_group = staticmethod(ps.get_data_parallel_group)
    get_data_parallel_world_size = staticmethod(ps.get_data_parallel_world_size)


def deepspeed_config(cfg: Config, num_microbatches: int, bf16: bool) -> dict:
    """The DeepSpeed config generated from ours; `deepspeed.config_file` entries override it."""
    d, t = cfg.deepspeed, cfg.train
    zero = {"stage": d.zero_stage}
    if d.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if d.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    generated = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": num_microbatches,
        "gradient_clipping": t.clip_grad,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
    }
    if d.config_file:
        path = Path(d.config_file)
        try:
            user = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ConfigError(f"deepspeed.config_file: cannot read {path} ({err})") from None
        generated = _merged(generated, user)
    return generated


def _merged(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(
            out.get(key), dict) else value
    return out


def _param_groups(model: torch.nn.Module, cfg: Config) -> list[dict]:
    """As megatron-core builds them: no weight decay on biases and 1-D parameters (norms);
    parameters the family gives their own LR schedule (max_lr, min_lr: what megatron-core's
    scheduler reads from a group) in a group of their own."""
    family, train = family_of(cfg), cfg.train
    # (wd_mult: megatron-core's LR/WD scheduler multiplies the scheduled decay by it)
    decay = {"params": [], "weight_decay": train.weight_decay, "wd_mult": 1.0}
    no_decay = {"params": [], "weight_decay": 0.0, "wd_mult": 0.0}
    own: dict = {}  # pattern's schedule -> its group
    for name, p in model.named_parameters():
        schedule = family.lr_override(name, train)
        if p.ndim == 1 or name.endswith(".bias"):
            no_decay["params"].append(p)
        elif schedule is not None:
            key = tuple(sorted(schedule.items()))
            own.setdefault(key, {"params": [], "weight_decay": train.weight_decay,
                                 "wd_mult": 1.0, **schedule})["params"].append(p)
        else:
            decay["params"].append(p)
    return [g for g in (decay, no_decay, *own.values()) if g["params"]]


class DeepSpeedEngine:
    def __init__(self, cfg: Config, tconfig, chunks: list):
        import deepspeed

        self.cfg = cfg
        t, module = cfg.train, chunks[0]
        num_microbatches = t.global_batch_size // (
            t.micro_batch_size * ps.get_data_parallel_world_size())
        optimizer = torch.optim.AdamW(_param_groups(module, cfg), lr=t.lr,
                                      betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
                                      fused=True)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=module, optimizer=optimizer, mpu=_MegatronMPU(),
            config=deepspeed_config(cfg, num_microbatches, tconfig.bf16))
        self.model = [self.engine]
        # ZeRO-3, and ZeRO-1/2 with the optimizer offloaded, overwrite a parameter's gradient
        # partition in a step's first micro-batch and add to it in later ones, never clearing it
        # (deepspeed 0.19.8: stage3.py partition_grads, stage_1_and_2.py
        # async_accumulate_grad_in_cpu_via_gpu): a gradient that first arrives in a later
        # micro-batch would get the previous step's added to it.
        d = cfg.deepspeed
        self.late_gradients = d.zero_stage < 3 and not d.offload_optimizer
        # PN: projected once per step where late gradients are summed right (the step's dL/dW
        # contracted in its last micro-batch's backward), else per micro-batch
        self.step_scope = family_of(cfg).step_scope(cfg, self.model, self.late_gradients)

    def parameter_elements(self) -> tuple[int, int]:
        """(elements this rank holds, elements of the model): ZeRO-3 holds a 1/DP partition."""
        params = list(self.engine.module.parameters())
        total = sum(getattr(p, "ds_numel", p.numel()) for p in params)
        held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
        return held, total

    def run_microbatches(self, forward_step, batches: list[dict], forward_only: bool):
        reports, iterator = [], iter(batches)
        for _ in batches:
            output, loss_func = forward_step(iterator, self.engine)
            loss_sum, count, report = loss_func(output)
            if not forward_only:
                # Mean over this micro-batch's tokens; DeepSpeed averages over accumulation
                # steps and DP ranks: the global token mean when micro-batches hold equal counts.
                self.engine.backward(loss_sum / count)
                self.engine.step()  # applies the update at the accumulation boundary only
            reports.append(report)
        return reports

    def train_step(self, forward_step, batches, scheduler, experts=()):
        scheduler.step(increment=1)  # sets the LR that the boundary step below uses
        with self.step_scope(experts=experts, micro_batches=len(batches)):
            reports = self.run_microbatches(forward_step, batches, forward_only=False)
        return reports, float(self.engine.get_global_grad_norm() or 0.0)

    def set_training(self, training: bool) -> None:
        self.engine.train(training)

    def load(self, path, scheduler) -> dict:
        path = Path(path)
        _, client = self.engine.load_checkpoint(str(path.parent), tag=path.name,
                                                load_lr_scheduler_states=False)
        scheduler.load_state_dict(client["scheduler"])
        checkpoint.set_rng_states(client["rng"])
        return {k: v for k, v in client.items() if k not in ("scheduler", "rng")}

    def save(self, root, step, scheduler, extra) -> Path:
        root, tag = Path(root), checkpoint.iteration_dir(root, step).name
        client = {"scheduler": scheduler.state_dict(), "rng": checkpoint.rng_states(),
                  "iteration": step,
                  "engine": "deepspeed", **extra}
        checkpoint.save_phase(root, step, lambda: self.engine.save_checkpoint(
            str(root), tag=tag, client_state=client, save_latest=False), root / tag)

        def publish():  # after every rank's files: never a half checkpoint
            if dist.get_rank() == 0:  # the tokenizer record, readable without the weights
                atomic_write_json(root / tag / DEEPSPEED_TOKENIZER, extra.get("tokenizer"))
                atomic_write_text(root / checkpoint.LATEST, f"{step}\n")

        checkpoint.save_phase(root, step, publish, root / tag)
        return root / tag


ENGINES = {"megatron": MegatronEngine, "deepspeed": DeepSpeedEngine}
