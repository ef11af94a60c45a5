"""`pn-data preprocess` and `pn-data merge`: text -> Megatron indexed dataset (.bin/.idx).

Every document is tokenized with SentencePiece and followed by the EOD token (the tokenizer's
EOS id, as `pn-data train-tokenizer` defines it); one input document is one Megatron document.
The output is what megatron-core's `IndexedDatasetBuilder` writes, byte-for-byte the format of
Megatron-LM's tools/preprocess_data.py (--append-eod, no --split-sentences), plus a JSON sidecar
PREFIX.json with counts, the tokenizer (path and sha256) and the inputs. Empty documents are
skipped (Megatron-LM would write zero-length ones) and counted.

Pipeline. The main process reads raw records and sends batches of them to `--workers`
processes (one SentencePiece processor each) that decode JSON, tokenize the whole batch in one
call and return one flat numpy array; the main process writes them in input order.

Sharding. The inputs, in order, form one virtual byte stream (see data_tools.readers);
`--shard i/n` takes the i-th of n equal byte ranges, cut at line (JSONL), row-group (Parquet)
or file (gzip/zstd, text directories) boundaries. Shards are therefore contiguous runs of
documents, and `pn-data merge` of shards 0..n-1 gives the same .bin/.idx bytes as one run.

Resuming. Work goes into PREFIX.parts/: the shard's byte range of each input is a *segment*,
and each segment is written as numbered *parts* of about `--part-tokens` tokens (at least one
batch, ~256 KB of text), each a small indexed dataset made atomically and marked done by a JSON
file written last (which records the records it covers). A rerun after a crash or kill keeps
the done parts (checked against their recorded sizes), skips the records they cover, and only
tokenizes the rest; plan.json refuses a resume with different inputs, tokenizer, text field or
shard (other options, e.g. --workers or --skip-bad, may change). When every part is done, the
parts are concatenated into PREFIX.bin/.idx, the sidecar is written, and PREFIX.parts/ is
removed. A lock file keeps two runs off the same PREFIX.
"""

from __future__ import annotations

import argparse
import fcntl
import itertools
import json
import shutil
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from data_tools import readers
from data_tools.arguments import default_workers, positive_int
from data_tools.indexed import (
    DatasetWriter,
    concat_datasets,
    dataset_paths,
    read_index_header,
    token_dtype,
)
from pn_base.fileio import atomic_write_json, check_writable, file_sha256

PLAN_VERSION = 1
DEFAULT_PART_TOKENS = 16_000_000
BATCH_BYTES = 1 << 18  # text per worker task: amortizes IPC, keeps parts and memory small
BATCH_RECORDS = 4096


# --------------------------------------------------------------------------------------------
# Plan: segments of the inputs for one shard


@dataclass(frozen=True)
class Segment:
    source: int  # index into the discovered sources
    start: int  # virtual byte range of that source
    stop: int


def parse_shard(text: str | None) -> tuple[int, int]:
    """'i/n' (0-based) -> (i, n); None -> the whole input (0, 1)."""
    if text is None:
        return 0, 1
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard expects i/n such as 3/16, got {text!r}") from None
    if not 0 <= index < count:
        raise ValueError(f"--shard {text}: need 0 <= i < n")
    return index, count


def plan_segments(sources: list[readers.Source], index: int, count: int) -> list[Segment]:
    """The byte ranges of each source that shard `index` of `count` covers."""
    total = sum(source.size for source in sources)
    low, high = total * index // count, total * (index + 1) // count
    segments, offset = [], 0
    for number, source in enumerate(sources):
        start, stop = max(low, offset), min(high, offset + source.size)
        if start < stop:
            segments.append(Segment(number, start - offset, stop - offset))
        offset += source.size
    return segments


# --------------------------------------------------------------------------------------------
# Workers: decode + tokenize one batch


@dataclass
class Batch:
    segment: int
    first_record: int  # index of payloads[0] within its segment
    kind: str
    payloads: list
    input_bytes: int  # virtual bytes these records span (progress)
    final: bool = False  # last batch of its segment


@dataclass
class Encoded:
    segment: int
    first_record: int
    records: int
    input_bytes: int
    final: bool
    tokens: np.ndarray  # all documents, each followed by EOD
    lengths: np.ndarray  # tokens per document (EOD included)
    skipped: Counter = field(default_factory=Counter)
    repaired: Counter = field(default_factory=Counter)
    first_bad: tuple[int, str] | None = None  # (record index in batch, message)


_worker: dict = {}  # this process's tokenizer and settings (one per worker process)


def init_worker(model_path: str, text_field: str, replace_invalid_utf8: bool, dtype) -> None:
    import sentencepiece

    _worker.update(
        sp=sentencepiece.SentencePieceProcessor(model_file=model_path),
        text_field=text_field,
        replace=replace_invalid_utf8,
        dtype=dtype,
    )


def encode_batch(batch: Batch) -> Encoded:
    texts, skipped, repaired, first_bad = readers.decode_batch(
        batch.kind, batch.payloads, _worker["text_field"], _worker["replace"]
    )
    # One SentencePiece call per batch; EOD (= EOS) is appended by its C++ side.
    ids = _worker["sp"].encode(texts, add_eos=True, num_threads=1)
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    tokens = np.fromiter(
        itertools.chain.from_iterable(ids), dtype=_worker["dtype"], count=int(lengths.sum())
    )
    return Encoded(
        batch.segment, batch.first_record, len(batch.payloads), batch.input_bytes, batch.final,
        tokens, lengths, skipped, repaired, first_bad,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Work directory: plan, done parts, lock


@dataclass
class SegmentProgress:
    parts: list[dict] = field(default_factory=list)  # markers of the done parts, in order

    @property
    def complete(self) -> bool:
        return bool(self.parts) and self.parts[-1]["last"]

    @property
    def records_done(self) -> int:
        return sum(part["records"] for part in self.parts)


def part_prefix(workdir: Path, segment: int, part: int) -> str:
    return str(workdir / f"s{segment:06d}-p{part:05d}")


def load_progress(workdir: Path, segment_count: int) -> list[SegmentProgress]:
    """Done parts per segment: a contiguous run 0..k-1 whose files match their markers.
    Anything after the first missing or damaged part is deleted (it will be redone)."""
    for stale in workdir.glob(".*.tmp"):  # temp files of a killed run
        _remove(stale)
    progress = [SegmentProgress() for _ in range(segment_count)]
    for segment, state in enumerate(progress):
        for part in itertools.count():
            prefix = part_prefix(workdir, segment, part)
            marker = _valid_marker(prefix)
            if marker is None or marker["first_record"] != state.records_done:
                _remove_parts_from(workdir, segment, part)
                break
            state.parts.append(marker)
            if marker["last"]:
                _remove_parts_from(workdir, segment, part + 1)
                break
    return progress


def _valid_marker(prefix: str) -> dict | None:
    try:
        marker = json.loads(Path(prefix + ".json").read_text())
        bin_path, idx_path = dataset_paths(prefix)
        if bin_path.stat().st_size == marker["bin_bytes"] and idx_path.stat().st_size == marker["idx_bytes"]:
            return marker
    except (OSError, ValueError, KeyError):
        pass
    return None


def _remove_parts_from(workdir: Path, segment: int, first_part: int) -> None:
    for path in workdir.glob(f"s{segment:06d}-p*"):
        if int(path.name.split("-p")[1].split(".")[0]) >= first_part:
            path.unlink()


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


def lock_workdir(workdir: Path):
    """Hold an exclusive lock for this run, released by the OS when this process dies (even by
    SIGKILL). A POSIX lock (lockf), not flock: forked workers must not inherit it, or a killed
    run's orphaned workers would hold it for a moment longer."""
    handle = open(workdir / "lock", "w")
    try:
        fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # EACCES or EAGAIN: held by another process
        handle.close()
        raise ValueError(f"{workdir} is in use by another running preprocess") from None
    return handle


def prepare_workdir(workdir: Path, plan: dict, outputs: list[Path], overwrite: bool):
    """Create or reuse PREFIX.parts/; returns its lock. Outputs are checked before any work:
    existing ones are only replaced with --overwrite, except by the run that owns the workdir."""
    if not workdir.exists():
        for path in outputs:
            check_writable(path, overwrite)
        workdir.mkdir(parents=True)
    lock = lock_workdir(workdir)
    plan_path = workdir / "plan.json"
    if plan_path.exists() and json.loads(plan_path.read_text()) != plan:
        if not overwrite:
            lock.close()
            raise ValueError(
                f"{workdir} holds an unfinished run with other inputs or settings; "
                "pass --overwrite to discard it, or rerun with the same arguments to resume"
            )
        for path in workdir.iterdir():
            if path.name != "lock":
                _remove(path)
    if not plan_path.exists():
        atomic_write_json(plan_path, plan)
    return lock


# --------------------------------------------------------------------------------------------
# Main process: batches in, parts out


def iter_batches(sources, segments, progress) -> Iterator[Batch]:
    """Batches of raw records of every unfinished segment, the last of each marked final."""
    for number, (segment, state) in enumerate(zip(segments, progress)):
        if state.complete:
            continue
        source = sources[segment.source]
        records = source.records(segment.start, segment.stop, skip=state.records_done)
        batches = _batches(number, source.kind, records, state.records_done)
        previous = next(batches, None)
        if previous is None:  # nothing (left) to read: an empty final batch closes the segment
            previous = Batch(number, state.records_done, source.kind, [], 0)
        for batch in batches:
            yield previous
            previous = batch
        previous.final = True
        yield previous


def _batches(segment: int, kind: str, records, first: int) -> Iterator[Batch]:
    payloads, size, advance = [], 0, 0
    for payload, step in records:
        payloads.append(payload)
        size += len(payload) if payload else 0
        advance += step
        if size >= BATCH_BYTES or len(payloads) >= BATCH_RECORDS:
            yield Batch(segment, first, kind, payloads, advance)
            first += len(payloads)
            payloads, size, advance = [], 0, 0
    if payloads:
        yield Batch(segment, first, kind, payloads, advance)


class PartWriter:
    """Receives encoded batches in order and writes them as parts of ~part_tokens tokens."""

    def __init__(self, workdir, sources, segments, progress, dtype, part_tokens, skip_bad,
                 on_part_written=None):  # fmt: skip
        self.workdir, self.sources, self.segments = workdir, sources, segments
        self.progress, self.dtype, self.part_tokens = progress, dtype, part_tokens
        self.skip_bad, self.on_part_written = skip_bad, on_part_written
        self.writer: DatasetWriter | None = None
        self.parts_written = 0

    def add(self, encoded: Encoded) -> None:
        if encoded.first_bad and not self.skip_bad:
            index, detail = encoded.first_bad
            segment = self.segments[encoded.segment]
            where = self.sources[segment.source].locate(
                segment.start, encoded.first_record + index
            )
            raise readers.BadRecordError(f"{where}: {detail}{readers.SKIP_HINT}")
        if self.writer is None:
            self._open(encoded)
        self.writer.add_documents(encoded.tokens, encoded.lengths)
        self.marker["records"] += encoded.records
        self.marker["input_bytes"] += encoded.input_bytes
        self.marker["skipped"].update(encoded.skipped)
        self.marker["repaired"].update(encoded.repaired)
        if encoded.final or self.writer.tokens >= self.part_tokens:
            self._close(last=encoded.final)

    def _open(self, encoded: Encoded) -> None:
        state = self.progress[encoded.segment]
        prefix = part_prefix(self.workdir, encoded.segment, len(state.parts))
        self.writer = DatasetWriter(prefix, self.dtype, overwrite=True).__enter__()
        self.marker = {
            "segment": encoded.segment, "part": len(state.parts),
            "first_record": encoded.first_record, "records": 0, "input_bytes": 0,
            "skipped": Counter(), "repaired": Counter(),
        }  # fmt: skip

    def _close(self, last: bool) -> None:
        writer, marker = self.writer, self.marker
        self.writer = None
        writer.__exit__(None, None, None)
        bin_path, idx_path = dataset_paths(writer.prefix)
        marker.update(
            documents=writer.documents, tokens=writer.tokens, last=last,
            bin_bytes=bin_path.stat().st_size, idx_bytes=idx_path.stat().st_size,
            skipped=dict(marker["skipped"]), repaired=dict(marker["repaired"]),
        )  # fmt: skip
        atomic_write_json(writer.prefix + ".json", marker)  # written last: marks the part done
        self.progress[marker["segment"]].parts.append(marker)
        self.parts_written += 1
        if self.on_part_written:
            self.on_part_written(marker)

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.__exit__(RuntimeError, RuntimeError("aborted"), None)
            self.writer = None


def _feed(items, slots: threading.Semaphore, stop: threading.Event, failures: list):
    """Tasks for Pool.imap's feeder thread. It takes a task only when a slot is free, so the
    input streams instead of being read into memory ahead of the workers; a reading error is
    handed to the main thread (an exception in the feeder thread would hang the pool)."""
    try:
        for item in items:
            while not slots.acquire(timeout=0.2):
                if stop.is_set():
                    return
            if stop.is_set():
                return
            yield item
    except Exception as err:
        failures.append(err)


def encode_all(batches, workers: int, init_args: tuple) -> Iterator[Encoded]:
    """Encoded batches in input order, from `workers` processes (0: in this process)."""
    if workers == 0:
        init_worker(*init_args)
        yield from map(encode_batch, batches)
        return
    import multiprocessing

    slots, stop, failures = threading.Semaphore(4 * workers), threading.Event(), []
    with multiprocessing.Pool(workers, initializer=init_worker, initargs=init_args) as pool:
        try:
            for encoded in pool.imap(encode_batch, _feed(batches, slots, stop, failures)):
                slots.release()
                yield encoded
        finally:
            stop.set()
    if failures:
        raise failures[0]


# --------------------------------------------------------------------------------------------
# The preprocess run


def make_progress_bar(total: int, initial: int, quiet: bool):
    from tqdm import tqdm

    return tqdm(
        total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024,
        desc="preprocess", disable=quiet, dynamic_ncols=True, smoothing=0.1,
        mininterval=1.0 if sys.stderr.isatty() else 30.0,
    )  # fmt: skip


def run_preprocess(
    inputs: list[str],
    tokenizer_model: str,
    output_prefix: str,
    *,
    workers: int = 1,
    shard: str | None = None,
    text_field: str = "text",
    overwrite: bool = False,
    skip_bad: bool = False,
    replace_invalid_utf8: bool = False,
    part_tokens: int = DEFAULT_PART_TOKENS,
    quiet: bool = False,
    on_part_written: Callable[[dict], None] | None = None,
) -> dict:
    """Tokenize `inputs` into OUTPUT_PREFIX.bin/.idx/.json (resuming an unfinished run);
    returns the sidecar contents plus this run's work (`this_run`)."""
    from data_tools.tokenizer import load_sentencepiece

    shard_index, shard_count = parse_shard(shard)
    sp = load_sentencepiece(tokenizer_model)  # before any output: a clear error
    sources = readers.discover(inputs, text_field)
    segments = plan_segments(sources, shard_index, shard_count)
    if shard_count == 1 and sum(s.stop - s.start for s in segments) == 0:
        raise ValueError(f"--input {' '.join(map(str, inputs))}: empty, no documents to "
                         "tokenize; give files that hold documents")
    tokenizer_path = str(Path(tokenizer_model).resolve())
    if sp.eos_id() < 0:
        raise ValueError(f"{tokenizer_model} defines no EOS id, which pn-data appends as EOD")
    dtype = token_dtype(sp.vocab_size())
    plan = {
        "version": PLAN_VERSION,
        "inputs": [source.fingerprint() for source in sources],
        "tokenizer": {"path": tokenizer_path, "sha256": file_sha256(tokenizer_path)},
        "text_field": text_field,
        "replace_invalid_utf8": replace_invalid_utf8,
        "shard": [shard_index, shard_count],
        "segments": [[s.source, s.start, s.stop] for s in segments],
    }
    outputs = [*dataset_paths(output_prefix), Path(output_prefix + ".json")]
    workdir = Path(output_prefix + ".parts")
    lock = prepare_workdir(workdir, plan, outputs, overwrite)
    try:
        progress = load_progress(workdir, len(segments))
        reused = sum(len(state.parts) for state in progress)
        writer = PartWriter(workdir, sources, segments, progress, dtype, part_tokens, skip_bad,
                            on_part_written)  # fmt: skip
        this_run = _encode_remaining(sources, segments, progress, writer, workers,
                                     (tokenizer_path, text_field, replace_invalid_utf8, dtype),
                                     quiet)  # fmt: skip
        this_run.update(parts_reused=reused, parts_written=writer.parts_written)
        sidecar = _finish(workdir, progress, plan, output_prefix, sp, dtype, sources)
    finally:
        lock.close()
    shutil.rmtree(workdir)
    return {**sidecar, "this_run": this_run}


def _encode_remaining(sources, segments, progress, writer, workers, init_args, quiet) -> dict:
    total = sum(s.stop - s.start for s in segments)
    done = sum(part["input_bytes"] for state in progress for part in state.parts)
    counts = Counter()
    started = time.perf_counter()
    bar = make_progress_bar(total, min(done, total), quiet)
    encoded_batches = encode_all(iter_batches(sources, segments, progress), workers, init_args)
    try:
        for encoded in encoded_batches:
            writer.add(encoded)
            counts.update(records=encoded.records, documents=len(encoded.lengths),
                          tokens=len(encoded.tokens))  # fmt: skip
            elapsed = max(time.perf_counter() - started, 1e-9)
            bar.set_postfix_str(
                f"{counts['documents'] / elapsed:,.0f} docs/s, {counts['tokens'] / elapsed:,.0f} tok/s",
                refresh=False,
            )
            bar.update(encoded.input_bytes)
    except BaseException:
        writer.abort()
        raise
    finally:
        encoded_batches.close()  # stops the worker pool now, also on errors
        bar.close()
    elapsed = time.perf_counter() - started
    return {
        "records_encoded": counts["records"],
        "documents_encoded": counts["documents"],
        "tokens_encoded": counts["tokens"],
        "seconds": round(elapsed, 3),
        "tokens_per_second": round(counts["tokens"] / max(elapsed, 1e-9), 1),
    }


def _finish(workdir, progress, plan, output_prefix, sp, dtype, sources) -> dict:
    """Concatenate the parts into the outputs and write the sidecar (last)."""
    parts = [part_prefix(workdir, m["segment"], m["part"]) for st in progress for m in st.parts]
    markers = [m for state in progress for m in state.parts]
    if parts:
        concat_datasets(parts, output_prefix, overwrite=True)
    else:  # a shard with no input at all: still a valid (empty) dataset for merge
        with DatasetWriter(output_prefix, dtype, overwrite=True):
            pass
    skipped, repaired = Counter(), Counter()
    for marker in markers:
        skipped.update(marker["skipped"])
        repaired.update(marker["repaired"])
    shard_index, shard_count = plan["shard"]
    sidecar = {
        "format": "megatron indexed dataset (.bin/.idx), one document per input document",
        "command": "pn-data preprocess",
        "documents": sum(m["documents"] for m in markers),
        "tokens": sum(m["tokens"] for m in markers),
        "records": sum(m["records"] for m in markers),
        "skipped": dict(sorted(skipped.items())),
        "repaired": dict(sorted(repaired.items())),
        "dtype": np.dtype(dtype).name,
        "eod_id": sp.eos_id(),
        "vocab_size": sp.vocab_size(),
        "tokenizer": plan["tokenizer"],
        "tokenizer_sha256": plan["tokenizer"]["sha256"],
        "text_field": plan["text_field"],
        "inputs": plan["inputs"],
        "shard": f"{shard_index}/{shard_count}",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if sidecar["documents"] == 0:
        print(f"warning: {output_prefix} holds no document", file=sys.stderr)
    atomic_write_json(output_prefix + ".json", sidecar)
    return sidecar


# --------------------------------------------------------------------------------------------
# Merge


def run_merge(inputs: list[str], output_prefix: str, overwrite: bool = False) -> dict:
    """Concatenate indexed datasets in the given order; shards of one preprocess run are put in
    shard order (so a shell glob works) and must all be present."""
    outputs = [*dataset_paths(output_prefix), Path(output_prefix + ".json")]
    for path in outputs:
        check_writable(path, overwrite)
    sidecars = [_read_sidecar(prefix) for prefix in inputs]
    order = merge_order(inputs, sidecars)
    inputs, sidecars = [inputs[i] for i in order], [sidecars[i] for i in order]
    documents, _ = concat_datasets(inputs, output_prefix, overwrite)
    merged = _merge_sidecars(inputs, sidecars, documents, output_prefix)
    atomic_write_json(output_prefix + ".json", merged, overwrite)
    return merged


def _read_sidecar(prefix: str) -> dict | None:
    for path in dataset_paths(prefix):
        if not path.exists():
            raise FileNotFoundError(f"merge input {path} does not exist")
    path = Path(prefix + ".json")
    return json.loads(path.read_text()) if path.exists() else None


def _sidecar_tokenizer(sidecar: dict) -> str | None:
    return sidecar.get("tokenizer_sha256") or sidecar.get("tokenizer", {}).get("sha256")


def merge_order(inputs: list[str], sidecars: list[dict | None]) -> list[int]:
    """Indices of `inputs` in merge order. Refuses mixing tokenizers. Shards i/n (n > 1) of one
    run (same inputs) are sorted by i and must be exactly 0..n-1, so the merge equals one run;
    anything else keeps the order given."""
    known = [s for s in sidecars if s]
    if len({_sidecar_tokenizer(s) for s in known}) > 1:
        raise ValueError("merge inputs were made with different tokenizers (sha256 differ)")
    given = list(range(len(inputs)))
    if len(known) < len(inputs) or not all(s.get("shard") for s in known):
        return given
    shards = [parse_shard(s["shard"]) for s in known]
    counts = {count for _, count in shards}
    same_run = len({json.dumps(s.get("inputs")) for s in known}) == 1
    if not same_run or counts != {shards[0][1]} or shards[0][1] == 1:
        return given
    order = sorted(given, key=lambda i: shards[i][0])
    present = [shards[i][0] for i in order]
    count = shards[0][1]
    if present != list(range(count)):
        missing = sorted(set(range(count)) - set(present))
        raise ValueError(
            f"merge inputs are shards of one {count}-way run, but shard(s) "
            f"{', '.join(map(str, missing)) or '(duplicated)'} are missing: the result would not "
            "equal one run"
        )
    return order


def _merge_sidecars(inputs, sidecars, documents, output_prefix) -> dict:
    known = [s for s in sidecars if s]
    skipped, repaired = Counter(), Counter()
    for s in known:
        skipped.update(s.get("skipped", {}))
        repaired.update(s.get("repaired", {}))
    dtype, _, _ = read_index_header(output_prefix)
    merged = {
        "format": "megatron indexed dataset (.bin/.idx), one document per input document",
        "command": "pn-data merge",
        "documents": documents,
        "tokens": Path(output_prefix + ".bin").stat().st_size // np.dtype(dtype).itemsize,
        "records": sum(s.get("records", 0) for s in known) if len(known) == len(inputs) else None,
        "skipped": dict(sorted(skipped.items())),
        "repaired": dict(sorted(repaired.items())),
        "dtype": np.dtype(dtype).name,
        "merged_from": [str(Path(p).resolve()) for p in inputs],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if known:
        for key in ("eod_id", "vocab_size", "tokenizer", "tokenizer_sha256", "text_field"):
            merged[key] = known[0].get(key)
        inputs_lists = {json.dumps(s.get("inputs")) for s in known}
        merged["inputs"] = known[0].get("inputs") if len(inputs_lists) == 1 else [
            item for s in known for item in s.get("inputs", [])
        ]
    return merged


# --------------------------------------------------------------------------------------------
# CLI


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "preprocess",
        help="tokenize documents into a Megatron indexed dataset (.bin/.idx + .json sidecar)",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help=readers.INPUTS_HELP)
    p.add_argument("--tokenizer-model", required=True, metavar="MODEL",
                   help="SentencePiece .model (from pn-data train-tokenizer); its EOS id is the EOD")
    p.add_argument("--output-prefix", required=True, metavar="PREFIX",
                   help="writes PREFIX.bin, PREFIX.idx and PREFIX.json (work in PREFIX.parts/)")
    p.add_argument("--workers", type=int, default=default_workers(), metavar="N",
                   help="tokenizer processes (default: the CPUs available, %(default)s here; "
                   "0 tokenizes in the main process)")
    p.add_argument("--shard", metavar="i/n",
                   help="process only the i-th (0-based) of n contiguous parts of the input, "
                   "e.g. $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT in an --array=0-(n-1) job "
                   "with --output-prefix out/shard-$SLURM_ARRAY_TASK_ID; `pn-data merge "
                   "--inputs out/shard-*` of all n equals one run byte for byte")
    p.add_argument("--text-field", default="text", metavar="NAME",
                   help="JSON field / Parquet column holding the document text (default: text)")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip and count malformed records (bad JSON, missing or non-string "
                   "field, invalid UTF-8) instead of stopping at the first one")
    p.add_argument("--replace-invalid-utf8", action="store_true",
                   help="replace invalid UTF-8 by U+FFFD and keep the document (counted)")
    p.add_argument("--part-tokens", type=positive_int, default=DEFAULT_PART_TOKENS, metavar="N",
                   help="tokens per resumable part (default: %(default)s); a kill loses at most "
                   "one part of work per run")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing outputs, and discard an unfinished run with other settings")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_preprocess_command)

    m = subparsers.add_parser(
        "merge",
        help="concatenate indexed datasets (e.g. the shards of one preprocess) into one",
        description="Concatenate Megatron indexed datasets in the order given. The shards of one "
        "`pn-data preprocess --shard i/n` run are recognised from their sidecars, put in shard "
        "order and required complete: their merge is byte-identical to an unsharded run. "
        "The sidecars' counts are summed into PREFIX.json; mixing tokenizers is refused.",
    )
    m.add_argument("--inputs", nargs="+", required=True, metavar="PREFIX",
                   help="dataset prefixes (PREFIX.bin + PREFIX.idx), in output order (the "
                   "shards of one preprocess run are put in shard order)")
    m.add_argument("--output-prefix", required=True, metavar="PREFIX",
                   help="writes PREFIX.bin, PREFIX.idx and PREFIX.json")
    m.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    m.set_defaults(func=_merge_command)


def _preprocess_command(args) -> int:
    if args.workers < 0:
        raise ValueError("--workers must be >= 0")
    result = run_preprocess(
        args.input, args.tokenizer_model, args.output_prefix, workers=args.workers,
        shard=args.shard, text_field=args.text_field, overwrite=args.overwrite,
        skip_bad=args.skip_bad, replace_invalid_utf8=args.replace_invalid_utf8,
        part_tokens=args.part_tokens, quiet=args.quiet,
    )  # fmt: skip
    run = result["this_run"]
    skipped = ", ".join(f"{n:,} {reason}" for reason, n in result["skipped"].items()) or "none"
    print(
        f"{args.output_prefix}: {result['documents']:,} documents, {result['tokens']:,} tokens "
        f"({result['dtype']}); skipped: {skipped}; this run encoded "
        f"{run['tokens_encoded']:,} tokens in {run['seconds']:.1f}s "
        f"({run['tokens_per_second']:,.0f} tok/s), reused {run['parts_reused']} finished part(s)"
    )
    return 0


def _merge_command(args) -> int:
    merged = run_merge(args.inputs, args.output_prefix, args.overwrite)
    print(f"{args.output_prefix}: {merged['documents']:,} documents, {merged['tokens']:,} tokens "
          f"from {len(args.inputs)} dataset(s)")  # fmt: skip
    return 0
