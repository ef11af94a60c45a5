"""Training data: Megatron indexed datasets through megatron-core's GPTDataset and
BlendedMegatronDatasetBuilder, served as this rank's micro-batches.

Sample order is global and depends only on the seed: step s uses samples
[s*G, (s+1)*G) of the shuffled dataset (G = global batch) and data-parallel rank r takes the r-th
contiguous slice of them. Changing DP (or the micro-batch size) regroups the same samples, so the
loss curve does not change. Every rank (all TP and PP ranks) reads its own micro-batches, so
whatever a batch carries (tokens, labels, later cluster ids) reaches every pipeline stage.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix,
    parse_and_normalize_split,
)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_pn.config import Config, DataConfig
from pn_base.errors import ConfigError, UserError


class DataError(UserError):
    """A dataset that is missing, corrupt or does not fit the run."""


@dataclass
class TokenIds:
    """The few tokenizer facts GPTDataset needs (it never tokenizes)."""

    eod: int
    vocab_size: int

    @property
    def pad(self) -> int:
        return self.eod

    @property
    def unique_identifiers(self) -> dict:  # part of the sample-index cache key
        return {"class": "TokenIds", "eod": self.eod, "vocab_size": self.vocab_size}


def token_ids(data: DataConfig, vocab_size: int) -> TokenIds:
    if data.tokenizer_model:
        from data_tools.tokenizer import load_sentencepiece

        path = Path(data.tokenizer_model)
        sp = load_sentencepiece(path, "data.tokenizer_model")
        if sp.get_piece_size() > vocab_size:
            raise DataError(
                f"data.tokenizer_model: {path} has {sp.get_piece_size()} pieces but "
                f"model.vocab_size is {vocab_size}; set model.vocab_size={sp.get_piece_size()}"
            )
        return TokenIds(eod=sp.eos_id(), vocab_size=vocab_size)
    return TokenIds(eod=data.eod_id, vocab_size=vocab_size)


@dataclass
class Blend:
    prefixes: list[str]
    weights: list[float] | None
    cluster_ids: list[int] | None  # cluster of each prefix (PN, SLM-mix); None for dense data


def resolve_blend(data: DataConfig, entries: list | None = None) -> Blend:
    """Prefixes, weights and cluster ids from `data.blend` / `data.blend_file` (or the given
    entries), each prefix checked."""
    if entries is not None:
        return _blend_of(list(entries), None)
    entries = list(data.blend)
    cluster_ids = data.cluster_ids
    if data.blend_file:
        path = Path(data.blend_file)
        try:
            content = json.loads(path.read_text())
            entries += content["blend"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise DataError(
                f"data.blend_file: cannot read {path} ({err}); expected JSON "
                "{'blend': [[weight, prefix], ...]}"
            ) from None
        if cluster_ids is None:
            cluster_ids = content.get("cluster_ids")
    return _blend_of(entries, cluster_ids)


def _blend_of(entries: list, cluster_ids) -> Blend:
    if not entries:
        raise ConfigError("data.blend: no dataset given; set data.blend=[PREFIX, ...]")
    weighted = [isinstance(e, (list, tuple)) for e in entries]
    if any(weighted) and not all(weighted):
        raise ConfigError("data.blend: give either all prefixes or all [weight, prefix] pairs")
    if all(weighted):
        weights = [float(w) for w, _ in entries]
        prefixes = [str(p) for _, p in entries]
    else:
        weights, prefixes = None, [str(p) for p in entries]
    for prefix in prefixes:
        check_indexed_dataset(prefix)
    if cluster_ids is not None and len(cluster_ids) != len(prefixes):
        raise ConfigError(
            f"data.cluster_ids: {len(cluster_ids)} ids for {len(prefixes)} blend entries; "
            "give one cluster id per dataset prefix"
        )
    return Blend(prefixes, weights, None if cluster_ids is None else [int(c) for c in cluster_ids])


def used_split(data: DataConfig, with_validation: bool) -> str:
    """`data.split` with the splits this run never reads set to 0, so none is built."""
    try:
        weights = [float(w) for w in data.split.split(",")]
        assert len(weights) == 3 and min(weights) >= 0 and weights[0] > 0
    except (ValueError, AssertionError):
        raise ConfigError(
            f"data.split: '{data.split}' must be three non-negative train,valid,test weights "
            "with train > 0, e.g. 969,30,1"
        ) from None
    if not with_validation:
        weights[1] = 0.0
    weights[2] = 0.0
    return ",".join(f"{w:g}" for w in weights)


def split_documents(n_docs: int, split: str, part: int) -> tuple[int, int] | None:
    """Documents [begin, end) of part 0 (train) or 1 (valid) of a dataset of `n_docs` under
    `split`, as megatron-core splits it (None: the split reads no such part)."""
    bounds = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))[part]
    return None if bounds is None else tuple(int(round(b * n_docs)) for b in bounds)


def check_split_nonempty(prefix: str, split: str) -> None:
    """Each split that is read must get at least one document of every dataset (megatron-core
    would otherwise loop forever looking for tokens)."""
    n_docs = len(IndexedDataset(prefix, mmap=True))
    for part, name in enumerate(("train", "valid")):
        documents = split_documents(n_docs, split, part)
        if documents is None:
            continue
        begin, end = documents
        if end <= begin:
            raise DataError(
                f"dataset prefix {prefix}: its {n_docs} documents leave none for the {name} "
                f"split of data.split={split}; add documents or change data.split"
            )


def check_long_enough(prefix: str, seq_length: int, split: str | None) -> None:
    """The training documents of a dataset (its train split when data.split applies) must fill
    one sequence: seq_length + 1 tokens (megatron-core would silently repeat them)."""
    dataset = IndexedDataset(prefix, mmap=True)  # alive while its memory map is read
    lengths = dataset.sequence_lengths
    if split:
        begin, end = split_documents(len(lengths), split, 0)
        lengths = lengths[begin:end]
    tokens = int(lengths.sum())
    del lengths, dataset
    if tokens < seq_length + 1:
        raise DataError(
            f"dataset prefix {prefix}: its training documents hold {tokens} tokens, fewer than "
            f"one sequence of model.seq_length {seq_length} + 1 ({prefix}.bin) — add documents "
            "or lower model.seq_length")


TOKEN_CHECK = 1 << 20  # tokens of each dataset read for the vocabulary check


def check_token_ids(prefix: str, vocab_size: int) -> None:
    """Token ids within model.vocab_size: the tokenizer size PREFIX.json records, and the largest
    id among the first TOKEN_CHECK tokens (an id beyond would fail deep in the embedding)."""
    sidecar = Path(prefix + ".json")
    recorded = None
    if sidecar.is_file():
        try:
            recorded = json.loads(sidecar.read_text()).get("vocab_size")
        except (ValueError, UnicodeDecodeError):
            recorded = None  # (the tokenizer check names a damaged record)
    dataset = IndexedDataset(prefix, mmap=True)
    head = np.memmap(prefix + ".bin", dtype=dataset.index.dtype, mode="r")[:TOKEN_CHECK]
    largest = int(head.max()) if len(head) else -1
    del head, dataset
    if (recorded or 0) > vocab_size or largest >= vocab_size:
        found = f"a tokenizer of {recorded} ids" if (recorded or 0) > vocab_size else \
            f"token id {largest}"
        raise DataError(f"dataset prefix {prefix}: {found}, beyond model.vocab_size "
                        f"{vocab_size} — set model.vocab_size to the tokenizer's size (or more), "
                        "or tokenize the data with the model's tokenizer")


def check_indexed_dataset(prefix: str) -> None:
    """A clear error for a missing or unreadable .bin/.idx pair, before any rank builds."""
    for suffix in (".bin", ".idx"):
        if not os.path.isfile(prefix + suffix):
            raise DataError(
                f"dataset prefix {prefix}: {prefix + suffix} not found "
                "(create it with `pn-data preprocess`)"
            )
    try:
        dataset = IndexedDataset(prefix, mmap=True)
        n_tokens = int(dataset.sequence_lengths.sum())
        expected = os.path.getsize(prefix + ".bin") // dataset.index.dtype_size
    except Exception as err:  # megatron-core raises assertion/struct/numpy errors
        raise DataError(f"dataset prefix {prefix}: corrupt index {prefix}.idx ({err})") from None
    if n_tokens != expected or len(dataset) == 0:
        raise DataError(
            f"dataset prefix {prefix}: {prefix}.bin holds {expected} tokens but {prefix}.idx "
            f"describes {n_tokens} in {len(dataset)} documents; re-run `pn-data preprocess`"
        )


def build_datasets(cfg: Config, cache_dir: str):
    """The megatron-core training dataset, sized for the whole run. Its documents exclude the
    validation split's, which validation reads as fixed windows (training/validation.py)."""
    blend = resolve_blend(cfg.data)
    train_samples = cfg.train.steps * cfg.train.global_batch_size
    if cfg.data.valid_blend:  # separate validation data: every training document trains
        splits = {"blend_per_split": [(blend.prefixes, blend.weights), None, None]}
    else:
        splits = {"blend": (blend.prefixes, blend.weights),
                  "split": used_split(cfg.data, bool(cfg.train.eval_interval))}
    config = GPTDatasetConfig(
        random_seed=cfg.train.seed,
        sequence_length=cfg.model.seq_length,
        **splits,
        path_to_cache=cache_dir,
        tokenizer=token_ids(cfg.data, cfg.model.vocab_size),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        mmap_bin_files=True,
    )
    for prefix in blend.prefixes if config.split else ():
        check_split_nonempty(prefix, config.split)
    if config.split:  # the training part only (the others are read elsewhere or not at all)
        config.split_matrix = [config.split_matrix[0], None, None]
    train, _, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [train_samples, 0, 0], lambda: True, config
    ).build()
    if train_samples and (train is None or len(train) == 0):
        raise DataError(f"data.split '{cfg.data.split}' leaves no training documents")
    return train


class StepSampler(torch.utils.data.Sampler):
    """This rank's micro-batches (lists of sample indices) for steps [start_step, end_step).

    With `group_keys` (the cluster of every sample index), each global batch is first ordered by
    cluster, so micro-batches hold one cluster (two at a boundary): the step still uses the same
    samples, only their grouping into micro-batches and DP ranks changes.
    """

    def __init__(self, start_step, end_step, global_batch, micro_batch, dp_rank, dp_size,
                 group_keys=None):
        self.steps = range(start_step, end_step)
        self.global_batch, self.micro_batch = global_batch, micro_batch
        self.per_rank = global_batch // dp_size
        self.dp_rank = dp_rank
        self.group_keys = group_keys

    def __iter__(self):
        for step in self.steps:
            batch = np.arange(step * self.global_batch, (step + 1) * self.global_batch)
            if self.group_keys is not None:
                batch = batch[np.argsort(self.group_keys[batch], kind="stable")]
            mine = batch[self.dp_rank * self.per_rank:(self.dp_rank + 1) * self.per_rank]
            for start in range(0, self.per_rank, self.micro_batch):
                yield mine[start:start + self.micro_batch].tolist()

    def __len__(self):
        return len(self.steps) * (self.per_rank // self.micro_batch)


def micro_batch_loader(dataset, sampler: StepSampler, num_workers: int, pin_memory: bool,
                       ahead: int = 0):
    """Micro-batches in sampler order. With workers, at least `ahead` micro-batches are read
    (and pinned, for non-blocking copies to the GPU) while the model computes: give a step's
    worth and the next step's micro-batches are ready when it starts."""
    prefetch = {"prefetch_factor": max(2, math.ceil(ahead / num_workers)),
                "persistent_workers": True} if num_workers > 0 else {}
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                       pin_memory=pin_memory, **prefetch)


def cluster_ids_of(batch: dict, cluster_table: torch.Tensor) -> torch.Tensor:
    """The cluster of every row of a micro-batch (host tensor [b]).

    A blend's `dataset_id` is the position of the sequence's dataset in the blend, and
    `cluster_table[position]` its cluster (a single dataset has no `dataset_id`: position 0).
    A batch of held-out windows carries its rows' clusters (`cluster_ids`) itself.
    """
    if "cluster_ids" in batch:
        return batch["cluster_ids"]
    positions = batch.get("dataset_id")
    if positions is None:
        positions = torch.zeros(len(batch["tokens"]), dtype=torch.long)
    return cluster_table[positions.long()]
