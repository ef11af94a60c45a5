"""The Trainer's validation: the validation split and train.eval_sets, each a fixed set of
windows read as pn-eval reads a held-out set (evaluate.held_out: every token predicted once, in
windows of the model's context within documents) and scored through the engine's forward, at
any TP/PP/DP layout and on either engine.

The validation split (the loss the selection compares, logged as 'valid' with its standard
error) is data.valid_blend's documents, or else the validation documents data.split gives each
training dataset (megatron-core's split, which training leaves out); of each dataset, the first
windows up to its share of train.valid_tokens (by blend weight; unweighted, by its validation
tokens). The same windows at every evaluation, in every run of the config: no random batches.
A routed family's windows carry their dataset's cluster (a PN: its expert computes them).

The token-loss reductions the training step uses too are here: per micro-batch a sum and a
count, then the global mean over micro-batches and data-parallel ranks.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_pn.config import Config
from megatron_pn.data import resolve_blend, split_documents, token_ids, used_split
from megatron_pn.evaluate import (HeldOut, configured_eval_sets, held_out, open_dataset,
                                  row_losses, set_result, window_batch)
from megatron_pn.families import family_of
from megatron_pn.training.selection import Scores
from pn_base.errors import ConfigError


def validation_windows(cfg: Config) -> list[HeldOut]:
    """The validation split as fixed windows, one set per validation dataset (none when the
    config has no validation data)."""
    data = cfg.data
    split = None if data.valid_blend else used_split(data, True)
    if split is not None and float(split.split(",")[1]) == 0:
        return []
    blend = resolve_blend(data, data.valid_blend or None)
    documents, tokens = [], []
    for prefix in blend.prefixes:
        dataset = open_dataset(prefix)  # alive while its index is read
        lengths = dataset.sequence_lengths
        begin, end = split_documents(len(lengths), split, 1) if split else (0, len(lengths))
        documents.append((begin, end))
        tokens.append(int(lengths[begin:end].sum()))  # each predicted once
    weights = blend.weights or tokens
    sets = []
    for i, prefix in enumerate(blend.prefixes):
        share = int(cfg.train.valid_tokens * weights[i] / sum(weights))
        held = held_out(Path(prefix).name, prefix, cfg.model.seq_length, share, documents[i])
        if family_of(cfg).routed:
            held.cluster_ids = np.full(len(held.windows), blend.cluster_ids[i], dtype=np.int64)
        if len(held.windows):  # (a dataset of weight 0 has none)
            sets.append(held)
    if not sets:
        raise ConfigError(f"train.valid_tokens: {cfg.train.valid_tokens} tokens leave no "
                          f"validation window over {len(blend.prefixes)} datasets — raise it")
    return sets


def windows_digest(sets: list[HeldOut]) -> str:
    """What names a list of window sets: their datasets, windows and clusters."""
    digest = hashlib.sha256()
    for held in sets:
        digest.update(held.prefix.encode())
        digest.update(np.ascontiguousarray(held.windows, dtype=np.int64).tobytes())
        if held.cluster_ids is not None:
            digest.update(held.cluster_ids.astype(np.int64).tobytes())
    return digest.hexdigest()[:16]


class Validation:
    def __init__(self, cfg: Config, dp_rank: int, dp_size: int, env):
        self.cfg, self.env = cfg, env
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.valid_sets = validation_windows(cfg) if cfg.train.eval_interval else []
        self.windows = windows_digest(self.valid_sets)
        self.eval_sets = configured_eval_sets(cfg)
        self.eod = token_ids(cfg.data, cfg.model.vocab_size).eod

    def scores(self, engine, forward_step) -> Scores | None:
        """The validation split's window scores, on every rank (None: no validation data)."""
        if not self.valid_sets:
            return None
        sums = [self.window_sums(engine, forward_step, held) for held in self.valid_sets]
        sizes = [held.windows[:, 2] for held in self.valid_sets]
        return Scores(np.concatenate(sums), np.concatenate(sizes), self.windows)

    def held_out(self, engine, forward_step) -> dict[str, dict]:
        """train.eval_sets, each as pn-eval evaluates it (PN: with the set's expert)."""
        return {held.name: set_result(held, self.window_sums(engine, forward_step, held))
                for held in self.eval_sets}

    @torch.no_grad()
    def window_sums(self, engine, forward_step, held: HeldOut) -> np.ndarray:
        """Every window's NLL sum (float64), on every rank. Data-parallel ranks score
        contiguous shares of the windows in as many micro-batches each (ZeRO-3 gathers weights
        collectively; an interleaved pipeline wants a multiple of its stages), and the sums of
        the last stage are all-reduced: each window is filled in by one rank, the others add
        zeros, so the result does not depend on the layout."""
        t, n = self.cfg.train, len(held.windows)
        if not n:  # (an SLM-mix expert's cluster may be absent from a set: on every rank)
            return np.zeros(0)
        share = math.ceil(n / self.dp_size)
        stages = self.cfg.parallel.pipeline
        micro = math.ceil(max(math.ceil(share / t.micro_batch_size), 1) / stages) * stages
        rows = np.arange(self.dp_rank * share, min((self.dp_rank + 1) * share, n))
        batches = [self.batch(held, rows[i * t.micro_batch_size:(i + 1) * t.micro_batch_size])
                   for i in range(micro)]
        engine.set_training(False)
        with family_of(self.cfg).eval_scope(engine.model):  # PN: each expert projected once
            reports = engine.run_microbatches(forward_step, batches, forward_only=True)
        engine.set_training(True)
        sums = torch.zeros(n, dtype=torch.float64, device=self.env.device)
        last = ps.is_pipeline_last_stage(ignore_virtual=True)
        if last and ps.get_tensor_model_parallel_rank() == 0:
            mine = torch.cat([report["window sums"] for report in reports])
            sums[torch.from_numpy(rows).to(sums.device)] = mine[:len(rows)].to(sums.device)
        dist.all_reduce(sums)
        return sums.cpu().numpy()

    def batch(self, held: HeldOut, rows: np.ndarray) -> dict[str, torch.Tensor]:
        """A micro-batch of windows in the training step's form, padded to its fixed shape."""
        shape = (self.cfg.train.micro_batch_size, self.cfg.model.seq_length)
        batch = window_batch(held, rows, self.eod, shape)
        batch["position_ids"] = torch.arange(shape[1]).expand(shape).contiguous()
        if held.cluster_ids is not None:  # padding rows: the first window's cluster
            clusters = np.full(shape[0], held.cluster_ids[rows[0]] if len(rows) else 0)
            clusters[:len(rows)] = held.cluster_ids[rows]
            batch["cluster_ids"] = torch.from_numpy(clusters)
        return batch


def token_loss(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """Sum of masked token losses and their count; megatron-core normalizes by the global count.
    Each row's sum is reported too: a held-out window's NLL sum (validation)."""
    mask = loss_mask.view(-1).float()
    loss_sum = torch.sum(per_token_loss.view(-1).float() * mask)
    count = mask.sum().to(torch.int)
    return loss_sum, count, {"lm loss": torch.stack([loss_sum.detach(), mask.sum()]),
                             "window sums": row_losses(per_token_loss.detach(), loss_mask)}


def mean_loss(losses: list[dict], device) -> float | None:
    """Global mean token loss over micro-batches and DP ranks (None off the last stage)."""
    if not ps.is_pipeline_last_stage(ignore_virtual=True):
        return None
    total = torch.stack([entry["lm loss"] for entry in losses]).sum(dim=0).to(device)
    dist.all_reduce(total, group=ps.get_data_parallel_group())
    return (total[0] / total[1]).item()
