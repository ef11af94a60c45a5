"""Reading documents from the corpus formats every `pn-data` step accepts.

Formats, chosen by file name:

* ``*.jsonl``/``*.json``: one JSON object per line, the document is one string field
  (``--text-field``, default ``text``); ``*.jsonl.gz``/``*.json.gz`` (gzip) and
  ``*.jsonl.zst``/``*.json.zst`` (zstandard) are the same, compressed.
* ``*.parquet``: one row per document, the document is one string column.
* ``*.txt``: one document per file. A directory is searched recursively: its ``.txt`` files
  form one text source (sorted by path), every other recognised file is read as above, and
  unrecognised files and hidden paths (``.cache/``) are ignored (the former reported).
* Hugging Face ``datasets``: a ``Dataset.save_to_disk`` directory (``state.json``,
  ``dataset_info.json``, ``data-*.arrow``) is read from its Arrow files, memory-mapped, one row
  per document (a ``DatasetDict`` directory is refused: pass one split's directory). A folder in
  the Hub layout (``data/train-00000-of-00042.parquet`` or ``.jsonl``) is a directory like any
  other; one holding shards of several splits is refused (pass one split's files).

Bad records. Every problem names the file and the line (JSONL), row (Parquet) or file (text):

* malformed JSON, a line that is not a JSON object, a missing text field, a field that is not a
  string, and invalid UTF-8 (bytes that are not UTF-8, or lone surrogate escapes such as
  ``"\\ud800"`` in JSON) are errors; with ``skip_bad`` such records are skipped and counted by
  reason. With ``replace_invalid_utf8`` invalid UTF-8 is instead replaced by U+FFFD and the
  document kept (counted as ``utf8_replaced``).
* empty documents (empty or whitespace-only text) and blank JSONL lines are always skipped and
  counted (``empty``, ``blank_line``): they carry no tokens worth training on.

Sources are also the unit `pn-data preprocess` cuts into shards: each has a *virtual size* (bytes
for JSONL and text, compressed bytes for gzip/zstd, uncompressed row-group sizes for Parquet,
record-batch sizes for Arrow) and
every record has a virtual start offset; a record belongs to the byte range holding its start.
Plain JSONL can be cut anywhere (a range reads the lines that start in it); gzip/zstd files
cannot be cut (all their records start at offset 0); Parquet is cut between row groups, Arrow
between record batches and a text directory between files.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

# Payload kinds: what a raw record is before decoding (decoding runs in worker processes).
JSON_LINE = "json"  # bytes of one JSONL line
TEXT_FILE = "text"  # bytes of one .txt file
STRING = "str"  # a str (or None) from a Parquet column

# Skip reasons that are errors unless the caller asked to skip bad records.
INPUTS_HELP = ("input files or directories: .jsonl/.json (optionally .gz or .zst), .parquet, "
               ".txt, directories of them (e.g. a Hugging Face Hub-layout folder) or a Hugging "
               "Face `save_to_disk` dataset directory (read in the order given)")
BAD_REASONS = ("malformed_json", "missing_field", "not_a_string", "invalid_utf8")
# Skip reasons that are never errors.
EMPTY_REASONS = ("blank_line", "empty")
REPLACED_UTF8 = "utf8_replaced"

_JSON_SUFFIXES = (".jsonl", ".json")
_COMPRESSED = {".gz": "gzip", ".zst": "zstd"}
_SURROGATES = re.compile("[\ud800-\udfff]")


class BadRecordError(ValueError):
    """A record cannot be read; the message names the file and line/row."""


@dataclass
class ReadStats:
    """Counts of records read, documents kept, skipped ones by reason."""

    records: int = 0
    documents: int = 0
    skipped: Counter = field(default_factory=Counter)
    repaired: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        return {
            "records": self.records,
            "documents": self.documents,
            "skipped": dict(sorted(self.skipped.items())),
            "repaired": dict(sorted(self.repaired.items())),
        }


def decode_payload(kind: str, payload, text_field: str, replace_invalid_utf8: bool):
    """Turn one raw record into its text.

    Returns ``(text, note, detail)``: ``text`` is None when the record is skipped, ``note`` the
    skip reason (or ``utf8_replaced`` for a kept, repaired document), ``detail`` a human message.
    """
    if kind == STRING:
        if payload is None:
            return None, "missing_field", f"'{text_field}' is null"
        return _check_text(payload)
    note = None
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as err:
        where = f"byte {err.start}"
        if kind == TEXT_FILE:
            line = payload.count(b"\n", 0, err.start) + 1
            where = f"line {line}, {where}"
        if not replace_invalid_utf8:
            return None, "invalid_utf8", f"invalid UTF-8 at {where}"
        text, note = payload.decode("utf-8", "replace"), REPLACED_UTF8
    if kind == JSON_LINE:
        text, reason, detail = _text_from_json(text, text_field)
        if text is None:
            return None, reason, detail
        if not text.isascii() and _SURROGATES.search(text):
            if not replace_invalid_utf8:
                return None, "invalid_utf8", "lone surrogate escape (not valid UTF-8)"
            text, note = _SURROGATES.sub("\ufffd", text), REPLACED_UTF8
    text, reason, detail = _check_text(text)
    return text, reason or note, detail


_JSON_DECODER = json.JSONDecoder()


def decode_batch(kind: str, payloads: list, text_field: str, replace_invalid_utf8: bool):
    """`decode_payload` over a batch. Returns ``(texts, skipped, repaired, first_bad)``: the
    kept texts in order, Counters of skip reasons and repairs, and ``(index, detail)`` of the
    first bad record (None if none).

    Well-formed JSON lines take a fast path (no per-record function calls: this loop runs for
    every document of the corpus); anything unusual goes through `decode_payload`, which
    defines the behaviour.
    """
    texts, skipped, repaired, first_bad = [], Counter(), Counter(), None
    fast = kind == JSON_LINE
    decode_json, surrogates = _JSON_DECODER.decode, _SURROGATES.search
    for index, payload in enumerate(payloads):
        if fast:
            try:
                text = decode_json(payload.decode("utf-8"))[text_field]
                if type(text) is str and text and not text.isspace() and (
                    text.isascii() or not surrogates(text)
                ):
                    texts.append(text)
                    continue
            except Exception:  # noqa: BLE001 - decode_payload below names the problem
                pass
        text, note, detail = decode_payload(kind, payload, text_field, replace_invalid_utf8)
        if text is None:
            skipped[note] += 1
            if first_bad is None and note in BAD_REASONS:
                first_bad = (index, detail)
            continue
        if note:
            repaired[note] += 1
        texts.append(text)
    return texts, skipped, repaired, first_bad


def _text_from_json(line: str, text_field: str):
    if not line or line.isspace():
        return None, "blank_line", "blank line"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        return None, "malformed_json", f"malformed JSON ({err.msg} at column {err.colno})"
    if not isinstance(obj, dict):
        return None, "malformed_json", f"not a JSON object but {type(obj).__name__}"
    if text_field not in obj:
        fields = ", ".join(sorted(obj)[:10]) or "none"
        return None, "missing_field", f"no field '{text_field}' (fields: {fields})"
    text = obj[text_field]
    if not isinstance(text, str):
        return None, "not_a_string", f"field '{text_field}' is {type(text).__name__}, not a string"
    return text, None, ""


def _check_text(text: str):
    if not text or text.isspace():
        return None, "empty", "empty document"
    return text, None, ""


# --------------------------------------------------------------------------------------------
# Sources


class Source:
    """One input the planner can cut: a data file, or all .txt files of a directory."""

    kind: str
    path: Path
    size: int  # virtual size in bytes

    def records(self, start: int, stop: int, skip: int = 0) -> Iterator[tuple[object, int]]:
        """Yield ``(payload, advance)`` for the records starting in ``[start, stop)``, after
        skipping the first ``skip`` of them unread-ish (not decoded). ``advance`` is how many
        virtual bytes the record moved the reader (for progress bars)."""
        raise NotImplementedError

    def locate(self, start: int, index: int) -> str:
        """Where record ``index`` of the range starting at ``start`` is, for error messages."""
        raise NotImplementedError

    def fingerprint(self) -> dict:
        """What identifies this input's content cheaply (a changed file invalidates a resume)."""
        stat = self.path.stat()
        return {"path": str(self.path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


class JsonlSource(Source):
    """Uncompressed JSONL: cut anywhere, a range reads the lines that start inside it."""

    kind = JSON_LINE

    def __init__(self, path: Path):
        self.path = path
        self.size = path.stat().st_size

    def records(self, start, stop, skip=0):
        with open(self.path, "rb") as f:
            pos = _seek_line_start(f, start)
            index = 0
            while pos < stop:
                line = f.readline()
                if not line:
                    break
                pos += len(line)
                if index >= skip:
                    yield line, len(line)
                index += 1

    def locate(self, start, index):
        return f"{self.path}:{_line_number_at(self.path, start) + index}"


class CompressedJsonlSource(Source):
    """gzip/zstd JSONL: read as one stream (cannot be cut); progress in compressed bytes."""

    kind = JSON_LINE

    def __init__(self, path: Path, codec: str):
        self.path = path
        self.codec = codec
        self.size = max(path.stat().st_size, 1)

    def records(self, start, stop, skip=0):
        if start > 0:  # every record of an uncuttable file starts at offset 0
            return
        with open(self.path, "rb") as raw:
            stream = self._open(raw)
            last = 0
            for index, line in enumerate(stream):
                pos = raw.tell()
                if index < skip:
                    last = pos
                    continue
                yield line, pos - last
                last = pos

    def _open(self, raw):
        if self.codec == "gzip":
            return io.BufferedReader(gzip.GzipFile(fileobj=raw, mode="rb"), 1 << 20)
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw), 1 << 20)

    def locate(self, start, index):
        return f"{self.path}:{index + 1}"


class RowGroupSource(Source):
    """Columnar files (Parquet, Arrow): cut between row groups (record batches); one row is one
    document. Subclasses give the groups' byte sizes and rows, and read a group's text column."""

    kind = STRING

    def _set_groups(self, sizes: list[int], rows: list[int]) -> None:
        sizes = [max(size, 1) for size in sizes]
        self.group_rows = rows
        self.group_starts = [sum(sizes[:i]) for i in range(len(sizes))]
        self.size = sum(sizes)

    def _check_column(self, schema) -> None:
        import pyarrow as pa

        if self.text_field not in schema.names:
            columns = ", ".join(schema.names[:10])
            raise BadRecordError(f"{self.path}: no column '{self.text_field}' (columns: {columns})")
        kind = schema.field(self.text_field).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise BadRecordError(
                f"{self.path}: column '{self.text_field}' has type {kind}, not a string"
            )

    def _groups_in(self, start, stop):
        return [i for i, s in enumerate(self.group_starts) if start <= s < stop]

    def _read_groups(self, groups: list[int]) -> Iterator[list]:
        """The text column of each group, in order, as Python strings (or None)."""
        raise NotImplementedError

    def records(self, start, stop, skip=0):
        groups = self._groups_in(start, stop)
        while groups and skip >= self.group_rows[groups[0]]:  # skipped without reading
            skip -= self.group_rows[groups.pop(0)]
        for group, values in zip(groups, self._read_groups(groups)):
            values, skip = values[skip:], 0
            advance = self.group_starts[group + 1] if group + 1 < len(self.group_starts) else self.size
            advance -= self.group_starts[group]
            for i, value in enumerate(values):
                yield value, advance if i == len(values) - 1 else 0

    def locate(self, start, index):
        groups = self._groups_in(start, start + self.size)
        first_row = sum(self.group_rows[: groups[0]]) if groups else 0
        return f"{self.path}: row {first_row + index}"


class ParquetSource(RowGroupSource):
    """Parquet, e.g. the shards of a Hugging Face Hub dataset (data/train-00000-of-00042.parquet)."""

    def __init__(self, path: Path, text_field: str):
        import pyarrow.parquet as pq

        self.path = path
        self.text_field = text_field
        parquet_file = pq.ParquetFile(path)
        self._check_column(parquet_file.schema_arrow)  # fail before any work
        meta = parquet_file.metadata
        groups = range(meta.num_row_groups)
        self._set_groups([meta.row_group(i).total_byte_size for i in groups],
                         [meta.row_group(i).num_rows for i in groups])

    def _read_groups(self, groups):
        import pyarrow.parquet as pq

        parquet_file = pq.ParquetFile(self.path)
        for group in groups:
            table = parquet_file.read_row_group(group, columns=[self.text_field])
            yield table.column(self.text_field).to_pylist()


class ArrowStreamSource(RowGroupSource):
    """One data-NNNNN-of-NNNNN.arrow file of a Hugging Face `Dataset.save_to_disk` directory
    (the Arrow IPC stream format): memory-mapped and cut between record batches."""

    def __init__(self, path: Path, text_field: str):
        self.path = path
        self.text_field = text_field
        sizes, rows = [], []
        with self._open() as (stream, reader):
            self._check_column(reader.schema)
            position = stream.tell()
            for batch in reader:
                sizes.append(stream.tell() - position)
                rows.append(batch.num_rows)
                position = stream.tell()
        self._set_groups(sizes, rows)

    @contextlib.contextmanager
    def _open(self):
        import pyarrow as pa

        with pa.memory_map(str(self.path)) as stream:
            yield stream, pa.ipc.open_stream(stream)

    def _read_groups(self, groups):
        wanted = iter(groups)
        target = next(wanted, None)
        with self._open() as (_, reader):
            for number, batch in enumerate(reader):  # zero-copy: skipping a batch reads nothing
                if number == target:
                    yield batch.column(self.text_field).to_pylist()
                    target = next(wanted, None)
                    if target is None:
                        return


class TextDirSource(Source):
    """A set of .txt files, one document each, in sorted order; cut between files."""

    kind = TEXT_FILE

    def __init__(self, path: Path, files: list[Path]):
        self.path = path
        self.files = files
        sizes = [max(f.stat().st_size, 1) for f in files]
        self.starts = [0]
        for s in sizes:
            self.starts.append(self.starts[-1] + s)
        self.size = self.starts[-1]

    def _files_in(self, start, stop):
        return [i for i in range(len(self.files)) if start <= self.starts[i] < stop]

    def records(self, start, stop, skip=0):
        for i in self._files_in(start, stop)[skip:]:
            yield self.files[i].read_bytes(), self.starts[i + 1] - self.starts[i]

    def locate(self, start, index):
        return str(self.files[self._files_in(start, stop=self.size + 1)[index]])

    def fingerprint(self):
        files = [f.stat() for f in self.files]
        return {
            "path": str(self.path),
            "files": len(self.files),
            "size": sum(s.st_size for s in files),
            "mtime_ns": max((s.st_mtime_ns for s in files), default=0),
        }


def _seek_line_start(f, start: int) -> int:
    """Position `f` at the first line starting at or after byte `start`; return that offset."""
    if start == 0:
        f.seek(0)
        return 0
    f.seek(start - 1)
    return start - 1 + len(f.readline())  # rest of the line holding byte start-1


def _line_number_at(path: Path, offset: int) -> int:
    """1-based number of the line starting at byte `offset` (only computed for errors)."""
    count = 1
    with open(path, "rb") as f:
        f.seek(_seek_line_start(f, offset))
        end = f.tell()
        f.seek(0)
        while f.tell() < end:
            count += f.read(min(1 << 24, end - f.tell())).count(b"\n")
    return count


# --------------------------------------------------------------------------------------------
# Discovery


def _data_file_source(path: Path, text_field: str) -> Source | None:
    name = path.name.lower()
    if name.endswith(".parquet"):
        return ParquetSource(path, text_field)
    suffix = Path(name).suffix
    stem = Path(name[: -len(suffix)]) if suffix in _COMPRESSED else Path(name)
    if stem.suffix in _JSON_SUFFIXES:
        if suffix in _COMPRESSED:
            return CompressedJsonlSource(path, _COMPRESSED[suffix])
        return JsonlSource(path)
    return None


def discover(paths: list[str | os.PathLike], text_field: str = "text") -> list[Source]:
    """Expand the input arguments into sources, in a deterministic order."""
    sources: list[Source] = []
    for arg in paths:
        path = Path(arg).resolve()
        if not path.exists():
            raise FileNotFoundError(f"input {path} does not exist")
        if path.is_dir():
            sources.extend(_discover_dir(path, text_field))
        elif path.suffix.lower() == ".txt":
            sources.append(TextDirSource(path, [path]))
        else:
            source = _data_file_source(path, text_field)
            if source is None:
                raise ValueError(
                    f"input {path}: unsupported format (expected .jsonl/.json, optionally "
                    ".gz or .zst, .parquet, .txt or a directory)"
                )
            sources.append(source)
    return sources


def _saved_dataset(path: Path, text_field: str) -> list[Source] | None:
    """The .arrow files of a Hugging Face `Dataset.save_to_disk` directory in its state.json
    order, or None if `path` is not one."""
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits") or ["SPLIT"]
        raise ValueError(f"input {path} is a Hugging Face DatasetDict (splits: "
                         f"{', '.join(splits)}): pass one split's directory, e.g. "
                         f"{path / splits[0]}")
    state = path / "state.json"
    if not (state.is_file() and (path / "dataset_info.json").is_file()):
        return None
    sources = []
    for entry in json.loads(state.read_text()).get("_data_files", []):
        file = path / entry["filename"]
        if not file.is_file():
            raise FileNotFoundError(f"{file} (listed in {state}) does not exist: the saved "
                                    f"dataset is incomplete; save it again")
        sources.append(ArrowStreamSource(file, text_field))
    return sources


# Hub shard names: {split}-00000-of-00042.parquet (.jsonl, ...)
_HUB_SHARD = re.compile(r"^(?P<split>[\w.]+?)-\d{5}-of-\d{5}\.")


def _check_one_split(path: Path, files: list[Path]) -> None:
    """A Hub-layout folder with several splits would mix them into one corpus: refuse."""
    splits = {}
    for file in files:
        match = _HUB_SHARD.match(file.name)
        if match:
            splits.setdefault(match["split"], file)
    if len(splits) > 1:
        example = next(iter(splits.values()))
        raise ValueError(f"input directory {path} holds Hugging Face Hub shards of several "
                         f"splits ({', '.join(sorted(splits))}): pass one split's files, e.g. "
                         f"{example.parent}/{example.name.split('-')[0]}-*")


def _discover_dir(path: Path, text_field: str) -> list[Source]:
    saved = _saved_dataset(path, text_field)
    if saved is not None:
        return saved
    files = sorted(p for p in path.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    _check_one_split(path, files)
    texts = [p for p in files if p.suffix.lower() == ".txt"]
    sources, ignored = [], []
    for p in files:
        if p.suffix.lower() == ".txt":
            continue
        source = _data_file_source(p, text_field)
        (sources if source else ignored).append(source or p)
    if texts:
        sources.append(TextDirSource(path, texts))
    if not sources:
        raise ValueError(f"input directory {path} holds no .txt, .jsonl(.gz/.zst) or .parquet file")
    if ignored:
        print(f"note: ignored {len(ignored)} file(s) of unknown format in {path}, e.g. {ignored[0]}")
    return sources


# --------------------------------------------------------------------------------------------
# Sequential reading (tokenizer training, small tools)


def iter_texts(
    paths: list[str | os.PathLike],
    text_field: str = "text",
    skip_bad: bool = False,
    replace_invalid_utf8: bool = False,
    stats: ReadStats | None = None,
) -> Iterator[str]:
    """Yield the text of every document of the inputs, in order, applying the bad-record policy
    described in the module docstring. Counts go to `stats` if given."""
    stats = stats if stats is not None else ReadStats()
    for source in discover(paths, text_field):
        for index, (payload, _) in enumerate(source.records(0, source.size)):
            stats.records += 1
            text, note, detail = decode_payload(
                source.kind, payload, text_field, replace_invalid_utf8
            )
            if text is None:
                if note in BAD_REASONS and not skip_bad:
                    raise BadRecordError(f"{source.locate(0, index)}: {detail}{SKIP_HINT}")
                stats.skipped[note] += 1
                continue
            if note:
                stats.repaired[note] += 1
            stats.documents += 1
            yield text


SKIP_HINT = " (pass --skip-bad to skip and count such records)"
