"""Checkpoints through megatron-core `dist_checkpointing`.

Layout of `checkpoint.dir`:

    iter_0000100/                      one dist_checkpointing directory per saved step
    latest_checkpointed_iteration.txt  the newest *complete* save ("100")

A save is written to a hidden temporary directory, renamed once every rank has finished, and only
then is `latest` replaced (atomically). A crash during a save therefore leaves `latest` pointing
at the previous complete checkpoint. Sharded tensors carry their global shape and offset, so a
checkpoint loads into any TP/PP layout; per-rank RNG states are restored only when the layout is
unchanged (the condition for a bit-exact resume).
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

from megatron_pn.errors import UserError
from megatron_pn.fileio import atomic_write_text

LATEST = "latest_checkpointed_iteration.txt"
BEST = "best_checkpointed_iteration.txt"


class CheckpointError(UserError):
    """A checkpoint that is missing, damaged or does not fit the run."""


def iteration_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"iter_{step:07d}"


def latest_step(root: str | Path, marker_name: str = LATEST) -> int | None:
    marker = Path(root) / marker_name
    if not marker.is_file():
        return None
    text = marker.read_text().strip()
    if not text.isdigit() or not iteration_dir(root, int(text)).is_dir():
        raise CheckpointError(f"{marker}: names '{text}', which is not a saved iteration")
    return int(text)


def resolve(path: str | Path) -> Path:
    """A checkpoint root (its best if it keeps one, else its latest) or one iteration dir."""
    path = Path(path)
    if (path / BEST).is_file():
        return iteration_dir(path, latest_step(path, BEST))
    if (path / LATEST).is_file():
        return iteration_dir(path, latest_step(path))
    if (path / "metadata.json").is_file():
        return path
    raise CheckpointError(f"{path} is neither a checkpoint directory nor an iteration in one")


def has_training_state(path: str | Path) -> bool:
    """False for model-only checkpoints (pn-project, pn-import-hf). A DeepSpeed engine's
    checkpoint (not a dist_checkpointing directory) always holds one."""
    if not (Path(path) / "metadata.json").is_file():
        return True
    return "scheduler" in dist_checkpointing.load_common_state_dict(str(path))


def saved_config(path: str | Path):
    """The run config stored in a checkpoint (a root or one iteration directory)."""
    from megatron_pn.config import config_from_dict

    common = dist_checkpointing.load_common_state_dict(str(resolve(path)))
    if "config" not in common:
        raise CheckpointError(f"{path}: no run config in this checkpoint")
    return config_from_dict(common["config"], f"checkpoint {path}")


# ---------------------------------------------------------------------------------------------
# What goes into a checkpoint


def _layout() -> dict:
    return {
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "dp": ps.get_data_parallel_world_size(),
    }


def rng_states() -> dict:
    """Every random generator this process uses (Python, NumPy, torch, CUDA, TP tracker)."""
    return {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def set_rng_states(state: dict) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_state() -> ShardedObject:
    """This rank's generators, one object per (PP, TP, DP) rank."""
    state = rng_states()
    layout = _layout()
    shape = (layout["pp"], layout["tp"], layout["dp"])
    offset = (
        ps.get_pipeline_model_parallel_rank(),
        ps.get_tensor_model_parallel_rank(),
        ps.get_data_parallel_rank(),
    )
    return ShardedObject("rng_state", state, shape, offset, replica_id=0)


def _model_keys(chunks) -> list[str]:
    """Megatron-LM's naming: 'model', or 'model0', 'model1', ... per virtual pipeline stage."""
    return ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]


def _unwrap(chunk):
    """The GPTModel inside a DDP wrapper: its keys are the checkpoint's keys."""
    return getattr(chunk, "module", chunk)


def _model_state(chunks) -> dict:
    return {
        key: _unwrap(chunk).sharded_state_dict()
        for key, chunk in zip(_model_keys(chunks), chunks)
    }


def _optimizer_metadata(optimizer_format: str) -> dict:
    return {"distrib_optim_sharding_type": optimizer_format}


# ---------------------------------------------------------------------------------------------
# Save / load


def save(root, step: int, chunks, optimizer=None, scheduler=None, extra: dict | None = None,
         optimizer_format: str = "fully_reshardable", keep_last: int | None = None) -> Path:
    """Collective: every rank calls it. Returns the final iteration directory.

    Without an optimizer it writes model weights only (what `pn-project` produces and
    `checkpoint.load` reads)."""
    root = Path(root)
    final = iteration_dir(root, step)
    tmp = root / f".tmp_{final.name}"
    if dist.get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()

    metadata = _optimizer_metadata(optimizer_format)
    state = _model_state(chunks)
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=False,
                                                          metadata=metadata)
        state["scheduler"] = scheduler.state_dict()
        state["rng_state"] = _rng_state()
    state["iteration"] = step
    state["layout"] = _layout()
    state.update(extra or {})
    dist_checkpointing.save(state, str(tmp), content_metadata=metadata)
    dist.barrier()

    if dist.get_rank() == 0:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        atomic_write_text(root / LATEST, f"{step}\n")
        _prune(root, keep_last)
    dist.barrier()
    return final


def mark_best(root, step: int) -> None:
    if dist.get_rank() == 0:
        atomic_write_text(Path(root) / BEST, f"{step}\n")
    dist.barrier()


def _prune(root: Path, keep_last: int | None) -> None:
    if not keep_last:
        return
    best = latest_step(root, BEST)
    saved = sorted(root.glob("iter_*"))
    for old in saved[:-keep_last]:
        if best is None or old != iteration_dir(root, best):
            shutil.rmtree(old, ignore_errors=True)


def load(path: Path, chunks, optimizer=None, scheduler=None) -> dict:
    """Load model (and, if given, optimizer/scheduler/RNG) state saved at `path`.

    Returns the checkpoint's common entries (iteration, layout, anything passed as `extra`).
    """
    template = _model_state(chunks)
    if optimizer is not None:
        metadata = dist_checkpointing.load_content_metadata(str(path)) or {}
        template["optimizer"] = optimizer.sharded_state_dict(
            template, is_loading=True, metadata=metadata
        )
        common = dist_checkpointing.load_common_state_dict(str(path))
        if common.get("layout") == _layout():
            template["rng_state"] = _rng_state()
    state = dist_checkpointing.load(template, str(path))

    for key, chunk in zip(_model_keys(chunks), chunks):
        _unwrap(chunk).load_state_dict(state[key])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if "rng_state" in template:
            set_rng_states(state["rng_state"])
    return {k: v for k, v in state.items() if k not in template and k != "scheduler"}
