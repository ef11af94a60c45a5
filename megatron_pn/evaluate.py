"""`pn-eval`: token-level NLL and perplexity of a checkpoint on held-out sets, and their
macro-average (the paper's metric: mean NLL per token over domains, then exp).

    pn-eval --checkpoint runs/slm/ckpt --data held/arxiv,held/wiki --names arxiv,wiki
    pn-eval --checkpoint runs/pn/ckpt --data held/arxiv --expert 3 --output pn_e3.json

Windows. Every document (one sequence of the indexed dataset, ending with EOD) is read after an
EOD, as in training where a document follows the previous one's EOD, and cut into
non-overlapping windows of `model.seq_length` predicted tokens: window (doc, a, n) feeds
`([EOD] + doc)[a : a+n]` and predicts `doc[a : a+n]`. So every token of every document, its EOD
included, is predicted exactly once, with the context of its own document only; the result does
not depend on document order or batching (the batches are fixed: deterministic). The NLL of a set
is the sum of the per-token losses (megatron-core's, as in training) over its token count.

Models. Any dense checkpoint (SLM, LLM, a projected expert, an SLM-mix expert) at any TP/PP
layout loads into this one process; a PN checkpoint is evaluated with one expert for all
sequences (`--expert I`) or with each window's cluster (`--cluster-ids-from ASSIGN_DIR`, the
output of `pn-data assign` on that set). Under torchrun the model is split over all processes
with tensor parallelism (every rank reads the same batches).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megatron_pn.costs import macro_average as macro_average_nll
from megatron_pn.costs import mean_and_stderr
from megatron_pn.families import family_of
from megatron_pn.checkpoint_tools import (LoadedModel, ToolError, load_model,
                                    resolve_checkpoint)
from pn_base.tokenizer_identity import dataset_fingerprint, require_same

def model_eod_id(cfg) -> int:
    """The EOD id the model was trained with: its tokenizer's EOS when that file is here."""
    model_file = cfg.data.tokenizer_model
    if model_file and Path(model_file).is_file():
        from data_tools.tokenizer import load_sentencepiece

        return load_sentencepiece(model_file, "data.tokenizer_model").eos_id()
    return cfg.data.eod_id


# ---------------------------------------------------------------------------------------------
# Held-out windows


@dataclass
class HeldOut:
    name: str
    prefix: str
    dataset: object  # megatron-core IndexedDataset
    windows: np.ndarray  # int64 (n, 3): doc, first predicted token a, tokens predicted n
    cluster_ids: np.ndarray | None = None  # int64 (n,): the expert of each window

    @property
    def num_tokens(self) -> int:
        return int(self.windows[:, 2].sum())


def document_windows(lengths: np.ndarray, seq_length: int, max_tokens: int | None) -> np.ndarray:
    """(doc, a, n) for every window of every non-empty document, in order; with `max_tokens`,
    the first windows up to that many predicted tokens (the last one cut)."""
    from data_tools.windows import split_windows

    windows = split_windows(lengths, seq_length)  # (doc, start, end)
    windows[:, 2] -= windows[:, 1]
    sizes = windows[:, 2]
    if max_tokens is not None:
        before = np.cumsum(sizes) - sizes
        windows = windows[before < max_tokens]
        windows[:, 2] = np.minimum(windows[:, 2], max_tokens - before[: len(windows)])
    return windows


def open_dataset(prefix: str):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_pn.data import check_indexed_dataset

    check_indexed_dataset(prefix)  # a clear DataError for a missing or corrupt prefix
    return IndexedDataset(prefix, mmap=True)


def _token_memmap(prefix: str, dataset) -> np.ndarray:
    return np.memmap(prefix + ".bin", dtype=dataset.index.dtype, mode="r")


def check_tokens(held: HeldOut, vocab_size: int, eod: int) -> None:
    """Fail before any compute when the set was tokenized for another model: a token id beyond
    the model's vocabulary, or documents that do not end with the model's EOD."""
    if len(held.windows) == 0:
        return
    ds = held.dataset
    tokens = _token_memmap(held.prefix, ds)
    start = ds.index.sequence_pointers // ds.index.dtype_size
    used = np.unique(held.windows[:, 0])
    end = start[used[-1]] + ds.sequence_lengths[used[-1]]
    largest = int(tokens[start[used[0]]:end].max())
    if largest >= vocab_size:
        raise ToolError(
            f"tokenizer/vocabulary mismatch: {held.prefix} holds token id {largest} but the model "
            f"has {vocab_size} ids (model.vocab_size); tokenize the set with the model's tokenizer")
    last = tokens[start[used] + ds.sequence_lengths[used] - 1]
    if np.any(last != eod):
        first_bad = int(np.argmax(last != eod))
        raise ToolError(
            f"{held.prefix}: document {int(used[first_bad])} ends with token "
            f"{int(last[first_bad])}, not the model's EOD id {eod}: the set was tokenized with "
            "another tokenizer (or pass --eod-id)")


def window_clusters(assign_dir: str, held: HeldOut) -> np.ndarray:
    """The cluster of each eval window: that of the `pn-data assign` window of the same document
    holding its first predicted token (the last one of the document for its EOD); documents that
    got no window there (empty ones) take the set's most frequent cluster."""
    root = Path(assign_dir)
    paths = [root / "assignments.npy", root / "windows.npy"]
    for path in paths:
        if not path.is_file():
            raise ToolError(f"--cluster-ids-from: {path} not found (the output directory of "
                            "`pn-data assign` on this held-out set)")
    assignments, windows = (np.load(path) for path in paths)
    n_docs = len(held.dataset)
    if (len(assignments) != len(windows) or len(windows) == 0 or windows[:, 0].max() >= n_docs
            or np.any(windows[:, 2] > held.dataset.sequence_lengths[windows[:, 0]])):
        raise ToolError(f"--cluster-ids-from: {root} does not describe {held.prefix} "
                        f"({n_docs} documents): run `pn-data assign` on this set")
    span = int(held.dataset.sequence_lengths.max()) + 1
    keys = windows[:, 0].astype(np.int64) * span + windows[:, 1]
    order = np.argsort(keys, kind="stable")
    queries = held.windows[:, 0] * span + held.windows[:, 1]
    found = np.searchsorted(keys[order], queries, side="right") - 1
    rows = order[np.maximum(found, 0)]
    same_doc = (found >= 0) & (windows[rows, 0] == held.windows[:, 0])
    fallback = np.bincount(assignments).argmax()
    return np.where(same_doc, assignments[rows], fallback).astype(np.int64)


def held_out(name: str, prefix: str, seq_length: int, max_tokens: int | None,
             documents: tuple[int, int] | None = None) -> HeldOut:
    """A set as pn-eval reads it: every token of every document predicted once, in windows of
    the model's context, the first `max_tokens` of them (pn-eval, train.eval_sets, the
    validation split of pn-train, the experts' scores of pn-project); with `documents`, of the
    documents [begin, end) only (a split of the dataset)."""
    dataset = open_dataset(prefix)
    begin, end = documents or (0, len(dataset))
    windows = document_windows(dataset.sequence_lengths[begin:end], seq_length, max_tokens)
    windows[:, 0] += begin
    return HeldOut(name, prefix, dataset, windows)


def configured_eval_sets(cfg) -> list[HeldOut]:
    """train.eval_sets, at most train.eval_sets_max_tokens each, routed by the model's family
    (a PN: the set's expert or each window's cluster; an SLM-mix expert: its cluster's
    windows)."""
    sets = []
    for name, prefix, *route in cfg.train.eval_sets:
        held = held_out(name, prefix, cfg.model.seq_length, cfg.train.eval_sets_max_tokens)
        if route:
            family_of(cfg).route_held_out(cfg, held, route, window_clusters)
        sets.append(held)
    return sets


def held_out_sets(args, seq_length: int) -> list[HeldOut]:
    prefixes = split_list(args.data)
    names = split_list(args.names) if args.names else [Path(p).name for p in prefixes]
    if len(names) != len(prefixes):
        raise ToolError(f"--names: {len(names)} names for {len(prefixes)} --data prefixes")
    if len(set(names)) != len(names):
        raise ToolError(f"dataset names must be distinct, got {', '.join(names)} (use --names)")
    sets = []
    for name, prefix in zip(names, prefixes):
        sets.append(held_out(name, prefix, seq_length, args.max_tokens))
        if len(sets[-1].windows) == 0:
            raise ToolError(f"{prefix} holds no token to evaluate")
    return sets


def split_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


# ---------------------------------------------------------------------------------------------
# Evaluation


def window_batch(held: HeldOut, rows: np.ndarray, eod: int,
                 shape: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """Inputs, labels and loss mask of some windows, right-padded to the longest (or to
    `shape`, rows and length: padding rows predict nothing)."""
    shape = shape or (len(rows), int(held.windows[rows, 2].max()))
    tokens = np.full(shape, eod, dtype=np.int64)
    labels = np.zeros(shape, dtype=np.int64)
    mask = np.zeros(shape, dtype=np.float32)
    for i, (doc, start, size) in enumerate(held.windows[rows]):
        # ([EOD] + doc)[a : a+n] and doc[a : a+n], read as one slice doc[a-1 : a+n]
        first = max(start - 1, 0)
        span = held.dataset.get(int(doc), int(first), int(start + size - first)).astype(np.int64)
        context = span[:-1] if start > 0 else np.concatenate([[eod], span[:-1]])
        tokens[i, :size] = context
        labels[i, :size] = span[-size:]
        mask[i, :size] = 1.0
    return {"tokens": torch.from_numpy(tokens), "labels": torch.from_numpy(labels),
            "loss_mask": torch.from_numpy(mask)}


def row_losses(per_token_loss: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Each row's sum of masked per-token losses (float64): a window's NLL sum."""
    mask = loss_mask.double()
    return (per_token_loss.view(mask.shape).double() * mask).sum(dim=1)


@torch.no_grad()
def batch_loss(loaded: LoadedModel, batch: dict, cluster_ids: torch.Tensor | None) -> np.ndarray:
    """Each window's NLL sum, megatron-core's per-token loss as in training."""
    routing = {} if cluster_ids is None else {"cluster_ids": cluster_ids}  # PN: host ids
    batch = {key: value.to(loaded.device) for key, value in batch.items()}
    tokens = batch["tokens"]
    positions = torch.arange(tokens.shape[1], device=loaded.device).expand_as(tokens)
    losses = loaded.model(tokens, positions, None, labels=batch["labels"], **routing)
    return row_losses(losses, batch["loss_mask"]).cpu().numpy()


def evaluate_set(loaded: LoadedModel, held: HeldOut, eod: int, batch_size: int,
                 progress: bool = False) -> dict:
    from tqdm import tqdm

    sums = []
    bar = tqdm(total=held.num_tokens, desc=held.name, unit="tok", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    with bar, family_of(loaded.cfg).eval_scope([loaded.model]):  # PN: each expert once
        for first in range(0, len(held.windows), batch_size):
            rows = np.arange(first, min(first + batch_size, len(held.windows)))
            ids = None if held.cluster_ids is None else torch.from_numpy(held.cluster_ids[rows])
            sums.append(batch_loss(loaded, window_batch(held, rows, eod), ids))
            bar.update(int(held.windows[rows, 2].sum()))
    return set_result(held, np.concatenate(sums or [np.zeros(0)]))


def set_result(held: HeldOut, sums: np.ndarray) -> dict:
    """A set's result from its windows' NLL sums: tokens, NLL, its standard error, perplexity
    (None without tokens: with --only-cluster a cluster may be absent from a set)."""
    nll, stderr = mean_and_stderr(sums, held.windows[:, 2])
    return {"name": held.name, "prefix": held.prefix, "tokens": held.num_tokens,
            "documents": int(len(np.unique(held.windows[:, 0]))),
            "windows": int(len(held.windows)), "nll": nll, "stderr": stderr,
            "ppl": None if nll is None else perplexity(nll)}


def perplexity(nll: float) -> float:
    return math.exp(min(nll, 700.0))  # exp overflows a float beyond ~709


def macro_average(results: list[dict]) -> dict:
    """The macro-average of the evaluated sets that have tokens (costs.macro_average)."""
    nll = macro_average_nll([r["nll"] for r in results if r["nll"] is not None])
    return {"nll": nll, "ppl": None if nll is None else perplexity(nll)}


def markdown_table(results: list[dict], macro: dict) -> str:
    def number(value, digits):
        return "–" if value is None else f"{value:.{digits}f}"

    lines = ["| dataset | tokens | NLL | perplexity |", "|---|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['name']} | {r['tokens']:,} | {number(r['nll'], 4)} | "
                     f"{number(r['ppl'], 2)} |")
    if len(results) > 1:
        lines.append(f"| macro-average | | {number(macro['nll'], 4)} | "
                     f"{number(macro['ppl'], 2)} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Routing (PN) and the command


def check_expert(m, expert: int | None, checkpoint, purpose: str,
                 other_routing: bool = False) -> None:
    """A routed (PN) checkpoint needs an expert (unless routed otherwise); a dense one takes
    none."""
    if not family_of(m).routed:
        if expert is not None or other_routing:
            raise ToolError(f"expert routing (--expert, --cluster-ids-from) applies to PN "
                            f"checkpoints; {checkpoint} is a model.type {m.type} checkpoint")
        return
    if expert is None and not other_routing:
        raise ToolError(f"{checkpoint} is a PN checkpoint ({m.num_experts} experts): pass "
                        f"--expert I to {purpose}")
    if expert is not None and not 0 <= expert < m.num_experts:
        raise ToolError(f"--expert {expert} is outside [0, model.num_experts = {m.num_experts})")


def route(m, args, sets: list[HeldOut]) -> dict:
    """Each window's expert (PN): --expert for all, or its cluster from --cluster-ids-from."""
    if args.only_cluster is not None:
        return only_cluster(m, args, sets)
    check_expert(m, args.expert, args.checkpoint, "compute every sequence with expert I (or "
                 "--cluster-ids-from ASSIGN_DIR for each window's cluster)",
                 other_routing=bool(args.cluster_ids_from))
    if not family_of(m).routed:
        return {}
    if args.expert is not None:
        for held in sets:
            held.cluster_ids = np.full(len(held.windows), args.expert, dtype=np.int64)
        return {"expert": args.expert}
    dirs = split_list(args.cluster_ids_from)
    if len(dirs) != len(sets):
        raise ToolError(f"--cluster-ids-from: {len(dirs)} directories for {len(sets)} --data "
                        "prefixes (one per prefix)")
    for held, directory in zip(sets, dirs):
        held.cluster_ids = window_clusters(directory, held)
        if held.cluster_ids.max() >= m.num_experts:
            raise ToolError(f"--cluster-ids-from {directory}: cluster {held.cluster_ids.max()} "
                            f"but the model has {m.num_experts} experts")
    return {"cluster_ids_from": dirs}


def only_cluster(m, args, sets: list[HeldOut]) -> dict:
    """Keep the windows of one cluster (e.g. an SLM-mix expert on its own cluster); a PN model
    computes them with that cluster's expert."""
    cluster = args.only_cluster
    dirs = split_list(args.cluster_ids_from or "")
    if len(dirs) != len(sets):
        raise ToolError(f"--only-cluster needs --cluster-ids-from with one directory per --data "
                        f"prefix ({len(sets)})")
    routed = family_of(m).routed
    if routed:
        check_expert(m, cluster, args.checkpoint, "")
    for held, directory in zip(sets, dirs):  # a cluster absent from a set: 0 tokens, no NLL
        held.windows = held.windows[window_clusters(directory, held) == cluster]
        if routed:
            held.cluster_ids = np.full(len(held.windows), cluster, dtype=np.int64)
    return {"cluster_ids_from": dirs, "only_cluster": cluster}


def evaluate(args, env) -> dict:
    """Every input is checked (against the checkpoint's config) before the model loads."""
    from megatron_pn.checkpoint import saved_config
    from megatron_pn.run_tokenizer import checkpoint_fingerprint

    path = resolve_checkpoint(args.checkpoint)
    saved = saved_config(path)
    m = saved.model
    eod = model_eod_id(saved) if args.eod_id is None else args.eod_id
    sets = held_out_sets(args, m.seq_length)
    trained = checkpoint_fingerprint(path)
    for held in sets:
        require_same(dataset_fingerprint(held.prefix), trained,
                     allow=args.allow_tokenizer_mismatch,
                     fix="use data tokenized with the checkpoint's tokenizer")
    for held in sets:
        check_tokens(held, m.vocab_size, eod)
    routing = route(m, args, sets)
    loaded = load_model(args.checkpoint, env, args.precision)
    progress = env.rank == 0 and not args.quiet
    results = [evaluate_set(loaded, held, eod, args.batch_size, progress) for held in sets]
    return {
        "checkpoint": str(loaded.path), "iteration": loaded.iteration, "model_type": m.type,
        "seq_length": m.seq_length, "precision": args.precision, "eod_id": eod,
        "max_tokens": args.max_tokens, "expert": routing.get("expert"),
        "cluster_ids_from": routing.get("cluster_ids_from"),
        "only_cluster": routing.get("only_cluster"),
        "datasets": results, "macro_average": macro_average(results),
    }
