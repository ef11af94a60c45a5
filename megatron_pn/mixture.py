"""Mixture training's data (`data.mixture`): each step, or each micro-batch, draws cluster weights
w and takes its sequences from the per-cluster datasets in proportion to w; the model computes
them all with the code of w (PNGPTModel.codes), so that any cluster histogram makes a good model.

    w ~ one-hot e_i, i ~ p      with probability data.mixture_one_hot (single experts stay trained)
    w ~ Dirichlet(c k p)        otherwise (c = data.mixture_concentration)

p is the blend's share of each cluster, so E[w] = p: on average the clusters are drawn as often
as hard routing draws them. Each sequence's dataset is drawn from w (then among a cluster's
datasets by their blend weights) and takes that dataset's next sample: one cursor per dataset
through megatron-core's shuffled sample order, wrapping around at its end.

Everything a step reads is a function of (train.seed, step) and the cursors, which are the
counts drawn by the steps before: a resumed run replays those draws (no state in the
checkpoint) and reads exactly the batches of an uninterrupted one. Every rank draws the whole
step and keeps its slice, so data-parallel ranks agree without communication.
"""

from __future__ import annotations

import numpy as np
import torch

from megatron_pn.config import Config


class MixtureDraws:
    """The draws of every step: mixture weights and each row's dataset, in global row order."""

    def __init__(self, cfg: Config, weights, cluster_ids, num_units: int):
        d = cfg.data
        self.seed, self.num_units = cfg.train.seed, num_units
        self.concentration, self.one_hot = d.mixture_concentration, d.mixture_one_hot
        shares = np.asarray(weights if weights is not None else [1.0] * len(cluster_ids), float)
        self.dataset_shares = shares / shares.sum()
        self.dataset_cluster = np.asarray(cluster_ids)
        self.k = cfg.model.num_experts
        self.cluster_shares = np.bincount(self.dataset_cluster, self.dataset_shares, self.k)
        self.fed = np.flatnonzero(self.cluster_shares > 0)  # clusters with data
        # a dataset's share of its cluster
        self.in_cluster = self.dataset_shares / self.cluster_shares[self.dataset_cluster]

    def draw_weights(self, rng: np.random.Generator) -> np.ndarray:
        """One mixture w over the k clusters (zero for clusters without data)."""
        w = np.zeros(self.k)
        p = self.cluster_shares[self.fed]
        if rng.random() < self.one_hot:
            w[self.fed[rng.choice(len(p), p=p)]] = 1.0
        else:
            w[self.fed] = rng.dirichlet(self.concentration * self.k * p)
        return w

    def step(self, step: int, rows: int) -> tuple[list[np.ndarray], np.ndarray]:
        """(the weights of each unit, the dataset of each of the step's `rows` rows)."""
        rng = np.random.default_rng([self.seed, step])
        per_unit = rows // self.num_units
        weights, datasets = [], []
        for _ in range(self.num_units):
            w = self.draw_weights(rng)
            chance = w[self.dataset_cluster] * self.in_cluster
            weights.append(w)
            datasets.append(rng.choice(len(chance), size=per_unit, p=chance / chance.sum()))
        return weights, np.concatenate(datasets)


class MixtureSampler(torch.utils.data.Sampler):
    """This rank's micro-batches for steps [start_step, end_step): lists of (dataset, sample
    index, mixture weights) keys for `MixtureSamples`. Global rows are ordered like StepSampler's:
    DP rank r holds the r-th slice, in micro-batches."""

    def __init__(self, draws: MixtureDraws, lengths, start_step, end_step, global_batch,
                 micro_batch, dp_rank, dp_size):
        self.draws, self.lengths = draws, np.asarray(lengths)
        self.steps = range(start_step, end_step)
        self.global_batch, self.micro_batch = global_batch, micro_batch
        self.per_rank, self.dp_rank = global_batch // dp_size, dp_rank
        self.cursors = np.zeros(len(lengths), dtype=np.int64)
        for step in range(start_step):  # the samples earlier steps took (a resumed run)
            self._take(step)

    def _take(self, step: int):
        """The step's unit weights and the (dataset, sample index) of each global row."""
        weights, datasets = self.draws.step(step, self.global_batch)
        order = np.argsort(datasets, kind="stable")
        counts = np.bincount(datasets, minlength=len(self.cursors))
        starts = np.cumsum(counts) - counts  # each dataset's first row in `order`
        nth = np.empty_like(datasets)
        nth[order] = np.arange(len(datasets)) - np.repeat(starts, counts)
        samples = (self.cursors[datasets] + nth) % self.lengths[datasets]
        self.cursors += counts
        return weights, datasets, samples

    def __iter__(self):
        unit_rows = self.global_batch // self.draws.num_units
        for step in self.steps:
            weights, datasets, samples = self._take(step)
            begin = self.dp_rank * self.per_rank
            for start in range(begin, begin + self.per_rank, self.micro_batch):
                yield [(int(datasets[r]), int(samples[r]),
                        tuple(map(float, weights[r // unit_rows])))
                       for r in range(start, start + self.micro_batch)]

    def __len__(self):
        return len(self.steps) * (self.per_rank // self.micro_batch)


class MixtureSamples(torch.utils.data.Dataset):
    """Samples of the blend's datasets by (dataset, index, weights): megatron-core's sample,
    its `dataset_id` (as a BlendedDataset's) and `mixture`, the weights of its micro-batch."""

    def __init__(self, blended, num_datasets: int):
        self.datasets = getattr(blended, "datasets", [blended])  # (one dataset: not blended)
        if len(self.datasets) != num_datasets:
            raise RuntimeError(f"the blended training data holds {len(self.datasets)} datasets "
                               f"for {num_datasets} blend entries")

    def __len__(self):
        return sum(len(d) for d in self.datasets)

    def __getitem__(self, key):
        dataset, index, weights = key
        sample = dict(self.datasets[dataset][index])
        sample["dataset_id"] = dataset
        sample["mixture"] = torch.tensor(weights, dtype=torch.float64)
        return sample


def mixture_sampling(cfg: Config, train_data, start_step: int, dp_rank: int, dp_size: int):
    """(dataset, batch sampler) of a mixture-trained run, from its blended training data."""
    from megatron_pn.data import resolve_blend

    t = cfg.train
    blend = resolve_blend(cfg.data)
    micro_batches = t.global_batch_size // t.micro_batch_size
    units = 1 if cfg.data.mixture == "step" else micro_batches
    draws = MixtureDraws(cfg, blend.weights, blend.cluster_ids, units)
    dataset = MixtureSamples(train_data, len(blend.prefixes))
    sampler = MixtureSampler(draws, [len(d) for d in dataset.datasets], start_step, t.steps,
                             t.global_batch_size, t.micro_batch_size, dp_rank, dp_size)
    return dataset, sampler
