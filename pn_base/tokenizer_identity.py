"""Tokenizer identity end to end: the sha256 of the SentencePiece .model that tokenized a dataset
or trained a checkpoint, recorded by what writes them and compared by every command that puts a
model and data (or a tokenizer) together.

Where it is recorded:
  dataset       PREFIX.json of `pn-data preprocess` ("tokenizer": {"path", "sha256"}); the
                per-cluster datasets of `pn-data cluster`: clusters.json in their directory
  spec set      histogram.json of `pn-data assign` ("tokenizer_sha256")
  tokenizer     PREFIX.model itself; PREFIX_hf/pn_tokenizer.json (`pn-data train-tokenizer`)
  checkpoint    its common state, beside the run config: "tokenizer": {"sha256", "model"}
                (pn-train, pn-project, pn-import-hf)
  HF export     config.json, "megatron_pn": {"tokenizer": {"sha256", "model"}}

`require_same` is the one comparison: a mismatch is one line naming both files, reported as a
ConfigError by each command; `--allow-tokenizer-mismatch` (pn-train:
`data.allow_tokenizer_mismatch=true`) lets it through. A file without a record (made before
tokenizers were recorded) is accepted: there is nothing to compare.

This module reads the records of files (datasets, spec sets, tokenizers, Hugging Face
directories); what a checkpoint records and which tokenizer a pn-train run trains with need
megatron and live in megatron_pn/run_tokenizer.py.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from pn_base.errors import ConfigError
from pn_base.fileio import file_sha256
from pn_base.outputs import HISTOGRAM

OVERRIDE_FLAG = "--allow-tokenizer-mismatch"
OVERRIDE_KEY = "data.allow_tokenizer_mismatch"
HF_RECORD = "pn_tokenizer.json"  # in a Hugging Face tokenizer directory
DEEPSPEED_TOKENIZER = "pn_tokenizer.json"  # in a DeepSpeed engine's iteration directory


class TokenizerMismatch(ConfigError):
    """Data, tokenizer and model disagree on the tokenizer."""


@dataclass(frozen=True)
class Fingerprint:
    sha256: str
    source: str  # the file (or checkpoint) that says so
    model: str | None = None  # the SentencePiece .model it names, when known
    kind: str = "data"  # data: a record in a file; tokenizer: the .model; checkpoint

    def record(self) -> dict:
        """What a checkpoint or an export stores."""
        return {"sha256": self.sha256, "model": self.model}

    def describe(self) -> str:
        short = f"{self.sha256[:12]}…"
        if self.kind == "checkpoint":
            name = f" ({Path(self.model).name})" if self.model else ""
            return f"checkpoint {self.source} was trained with {short}{name}"
        if self.kind == "tokenizer":
            return f"tokenizer {self.source} is {short}"
        return f"{self.source} records tokenizer {short}"


def require_same(given: Fingerprint | None, expected: Fingerprint | None, *, allow: bool,
                 fix: str, override: str | None = OVERRIDE_FLAG) -> None:
    """Refuse two different tokenizers (unless `allow`: then a warning); None matches anything.
    `override` names the flag or key that allows it (None: the command has none)."""
    if given is None or expected is None or given.sha256 == expected.sha256:
        return
    message = f"tokenizer mismatch: {given.describe()}, {expected.describe()}"
    if not allow:
        advice = f", or {_override_advice(override)}" if override else ""
        raise TokenizerMismatch(f"{message} — {fix}{advice}")
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"warning: {message} (allowed by {override})", file=sys.stderr, flush=True)


def _override_advice(override: str) -> str:
    return f"set {override}=true" if override == OVERRIDE_KEY else f"pass {override}"


def agreed(fingerprints, *, allow: bool, fix: str, override: str = OVERRIDE_FLAG):
    """The one tokenizer of several sources (the first that records one), all compared to it."""
    known = [fp for fp in fingerprints if fp is not None]
    for other in known[1:]:
        require_same(other, known[0], allow=allow, fix=fix, override=override)
    return known[0] if known else None


# -- reading the records --------------------------------------------------------------------------

def _read_json(path: Path) -> dict:
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: cannot read its tokenizer record ({err})") from None
    if not isinstance(content, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return content


def from_record(record, source, kind: str = "data") -> Fingerprint | None:
    """A stored {"sha256", "model"} (or a bare sha256 string); None when there is none."""
    if isinstance(record, str):
        record = {"sha256": record}
    if not isinstance(record, dict) or not record.get("sha256"):
        return None
    return Fingerprint(str(record["sha256"]), str(source), record.get("model") or
                       record.get("path"), kind)


def tokenizer_fingerprint(model_path: str | Path, what: str = "tokenizer") -> Fingerprint:
    """A SentencePiece .model file's own fingerprint."""
    path = Path(model_path)
    if not path.is_file():
        raise ConfigError(f"{what}: {path} does not exist (a SentencePiece .model)")
    return Fingerprint(file_sha256(path), str(path), str(path), "tokenizer")


def dataset_fingerprint(prefix: str | Path) -> Fingerprint | None:
    """What PREFIX.json records, else the clusters.json beside a per-cluster dataset."""
    sidecar = Path(f"{prefix}.json")
    if sidecar.is_file():
        meta = _read_json(sidecar)
        tokenizer = meta.get("tokenizer") if isinstance(meta.get("tokenizer"), dict) else {}
        return from_record({"sha256": meta.get("tokenizer_sha256") or tokenizer.get("sha256"),
                            "model": tokenizer.get("path")}, sidecar)
    manifest = Path(prefix).parent / "clusters.json"
    if manifest.is_file():
        meta = _read_json(manifest)
        if Path(prefix).name in meta.get("names", []):
            return from_record(meta.get("tokenizer_sha256"), manifest)
    return None


def spec_fingerprint(spec_dir: str | Path, spec: dict) -> Fingerprint | None:
    """A `pn-data assign` output: its HISTOGRAM (histogram.json), else the sidecar of its source dataset."""
    recorded = from_record(spec.get("tokenizer_sha256"), Path(spec_dir) / HISTOGRAM)
    if recorded is None and spec.get("source_prefix"):
        return dataset_fingerprint(spec["source_prefix"])
    return recorded


def hf_tokenizer_fingerprint(directory: str | Path) -> Fingerprint | None:
    """A Hugging Face tokenizer directory: its pn_tokenizer.json (`pn-data train-tokenizer`),
    else the PREFIX.json written beside PREFIX_hf/."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    own = directory / HF_RECORD
    if own.is_file():
        return from_record(_read_json(own), own)
    if directory.name.endswith("_hf"):
        beside = directory.with_name(directory.name[:-len("_hf")] + ".json")
        if beside.is_file():
            meta = _read_json(beside)
            if meta.get("hf_dir") and Path(meta["hf_dir"]).resolve() == directory.resolve():
                return from_record(meta, beside)
    return None


def hf_model_fingerprint(directory: str | Path, extras: dict) -> Fingerprint | None:
    """An exported Hugging Face model: config.json's record, else the tokenizer copied in."""
    recorded = from_record(extras.get("tokenizer"), Path(directory) / "config.json")
    return recorded or hf_tokenizer_fingerprint(directory)
