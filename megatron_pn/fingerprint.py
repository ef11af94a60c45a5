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
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from megatron_pn.config import ConfigError

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
    from data_tools.windows import file_sha256

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
    """A `pn-data assign` output: its histogram.json, else the sidecar of its source dataset."""
    recorded = from_record(spec.get("tokenizer_sha256"), Path(spec_dir) / "histogram.json")
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


def checkpoint_fingerprint(path: str | Path) -> Fingerprint | None:
    """What a checkpoint (root or iteration) records (a DeepSpeed engine's: its
    DEEPSPEED_TOKENIZER file); for one saved before tokenizers were recorded, its run config's
    data.tokenizer_model when that file is still there. None for a path that is no checkpoint
    (the command loading it reports that)."""
    from megatron.core import dist_checkpointing

    from megatron_pn import checkpoint

    deepspeed = Path(path) / DEEPSPEED_TOKENIZER  # a DeepSpeed iteration directory
    if deepspeed.is_file():
        return from_record(json.loads(deepspeed.read_text()), path, "checkpoint")
    try:
        iteration = checkpoint.resolve(path)
    except checkpoint.CheckpointError:  # not one: loading it says so
        return None
    if not (iteration / "metadata.json").is_file():  # DeepSpeed's (a root)
        return checkpoint_fingerprint(iteration) if (iteration / DEEPSPEED_TOKENIZER).is_file() \
            else None
    common = dist_checkpointing.load_common_state_dict(str(iteration))
    if "tokenizer" in common:
        return from_record(common["tokenizer"], iteration, "checkpoint")
    model_file = (common.get("config") or {}).get("data", {}).get("tokenizer_model")
    if model_file and Path(model_file).is_file():
        fp = tokenizer_fingerprint(model_file)
        return Fingerprint(fp.sha256, str(iteration), fp.model, "checkpoint")
    return None


# -- pn-train -------------------------------------------------------------------------------------

def run_prefixes(cfg) -> list[str]:
    """Every dataset a pn-train run reads: the blend, data.valid_blend, train.eval_sets."""
    from megatron_pn.data import resolve_blend

    prefixes = list(resolve_blend(cfg.data).prefixes)
    if cfg.data.valid_blend:
        prefixes += resolve_blend(cfg.data, cfg.data.valid_blend).prefixes
    prefixes += [str(entry[1]) for entry in cfg.train.eval_sets]
    return prefixes


def run_tokenizer(cfg, start: str | Path | None = None) -> Fingerprint | None:
    """The tokenizer a pn-train run trains with — data.tokenizer_model, else its datasets', all
    agreeing — checked against the checkpoint it starts from (resumed or checkpoint.load) and
    distill.teacher. Returns what its checkpoints record (the start's if the data has none)."""
    allow = cfg.data.allow_tokenizer_mismatch
    model = cfg.data.tokenizer_model
    given = [tokenizer_fingerprint(model, "data.tokenizer_model")] if model else []
    given += [dataset_fingerprint(prefix) for prefix in run_prefixes(cfg)]
    run = agreed(given, allow=allow, override=OVERRIDE_KEY,
                 fix="tokenize every dataset of a run with one tokenizer (data.tokenizer_model)")
    started = checkpoint_fingerprint(start) if start else None
    require_same(run, started, allow=allow, override=OVERRIDE_KEY,
                 fix="use data tokenized with the checkpoint's tokenizer")
    if cfg.distill.teacher:
        require_same(run or started, checkpoint_fingerprint(cfg.distill.teacher), allow=allow,
                     override=OVERRIDE_KEY,
                     fix="distill from a teacher trained with the student's tokenizer")
    return run or started
