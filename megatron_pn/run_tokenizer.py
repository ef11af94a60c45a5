"""The tokenizer of a checkpoint and of a pn-train run (pn_base/tokenizer_identity.py has the
records and the one comparison; this is the part that needs megatron: reading a checkpoint's
common state and resolving a run config's datasets)."""

from __future__ import annotations

import json
from pathlib import Path

from megatron.core import dist_checkpointing

from megatron_pn import checkpoint
from megatron_pn.data import resolve_blend
from pn_base.tokenizer_identity import (DEEPSPEED_TOKENIZER, OVERRIDE_KEY, Fingerprint, agreed,
                                        dataset_fingerprint, from_record, require_same,
                                        tokenizer_fingerprint)


# -- checkpoints ----------------------------------------------------------------------------------

def checkpoint_fingerprint(path: str | Path) -> Fingerprint | None:
    """What a checkpoint (root or iteration) records (a DeepSpeed engine's: its
    DEEPSPEED_TOKENIZER file); for one saved before tokenizers were recorded, its run config's
    data.tokenizer_model when that file is still there. None for a path that is no checkpoint
    (the command loading it reports that)."""
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
