"""The Trainer's validation: the loss on the same train.eval_steps validation batches every
time (comparable across steps and layouts: the loss the selection compares), and train.eval_sets
evaluated as pn-eval evaluates them (every token once, in the model's family's routing).

The token-loss reductions the training step uses too are here: per micro-batch a sum and a
count, then the global mean over micro-batches and data-parallel ranks.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_pn.config import Config
from megatron_pn.data import StepSampler, micro_batch_loader, token_ids
from megatron_pn.evaluate import configured_eval_sets, evaluate_set
from megatron_pn.families import family_of


class Validation:
    def __init__(self, cfg: Config, valid_data, dp_rank: int, dp_size: int, env):
        self.cfg, self.valid_data, self.env = cfg, valid_data, env
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.eval_sets = configured_eval_sets(cfg)
        self.eval_eod = token_ids(cfg.data, cfg.model.vocab_size).eod if self.eval_sets else None

    @torch.no_grad()
    def loss(self, engine, forward_step) -> float | None:
        """The mean token loss of the validation batches, on every rank (None: no data)."""
        if self.valid_data is None:
            return None
        t = self.cfg.train
        sampler = StepSampler(0, t.eval_steps, t.global_batch_size, t.micro_batch_size,
                              self.dp_rank, self.dp_size)
        batches = list(micro_batch_loader(self.valid_data, sampler, 0, False))
        engine.set_training(False)
        with family_of(self.cfg).eval_scope(engine.model):  # PN: each expert projected once
            losses = engine.run_microbatches(forward_step, batches, forward_only=True)
        engine.set_training(True)
        # Known on the last pipeline stage; every rank needs it (early stopping is collective).
        device = self.env.device
        loss = torch.tensor([mean_loss(losses, device) or 0.0], device=device)
        dist.broadcast(loss, src=self.env.world_size - 1)
        return loss.item()

    @torch.no_grad()
    def held_out(self, engine) -> dict[str, dict]:
        """train.eval_sets, each as pn-eval evaluates it (PN: with the set's expert)."""
        if not self.eval_sets:
            return {}
        loaded = SimpleNamespace(model=engine.model[0], cfg=self.cfg, device=self.env.device)
        engine.set_training(False)
        results = {held.name: evaluate_set(loaded, held, self.eval_eod,
                                           self.cfg.train.micro_batch_size)
                   for held in self.eval_sets}
        engine.set_training(True)
        return results


def token_loss(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """Sum of masked token losses and their count; megatron-core normalizes by the global count."""
    mask = loss_mask.view(-1).float()
    loss_sum = torch.sum(per_token_loss.view(-1).float() * mask)
    count = mask.sum().to(torch.int)
    return loss_sum, count, {"lm loss": torch.stack([loss_sum.detach(), mask.sum()])}


def mean_loss(losses: list[dict], device) -> float | None:
    """Global mean token loss over micro-batches and DP ranks (None off the last stage)."""
    if not ps.is_pipeline_last_stage(ignore_virtual=True):
        return None
    total = torch.stack([entry["lm loss"] for entry in losses]).sum(dim=0).to(device)
    dist.all_reduce(total, group=ps.get_data_parallel_group())
    return (total[0] / total[1]).item()
