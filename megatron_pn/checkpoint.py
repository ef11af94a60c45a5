"""Checkpoints through megatron-core `dist_checkpointing`.

Layout of `checkpoint.dir`:

    iter_0000100/                      one dist_checkpointing directory per saved step
    latest_checkpointed_iteration.txt  the newest *complete* save ("100")
    .pn-train.lock                     flock'ed by the run using the directory (its pid, host)

A save is written to a hidden temporary directory, renamed once every rank has finished, and only
then is `latest` replaced (atomically). A crash during a save therefore leaves `latest` pointing
at the previous complete checkpoint; a save that fails (a full disk) removes its temporary
directory and stops the run with one line (SaveFailed). On resume, `resume_step` passes over a
damaged latest iteration (a missing or truncated shard, missing metadata) for the newest intact
one. Sharded tensors carry their global shape and offset, so a checkpoint loads into any TP/PP
layout; per-rank RNG states are restored only when the layout is unchanged (the condition for a
bit-exact resume).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import random
import shutil
import signal
import socket
import traceback
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from torch.distributed.checkpoint.api import CheckpointException

from megatron_pn import compat
from megatron_pn.distributed import agreed
from pn_base.errors import UserError
from pn_base.fileio import atomic_write_text

LATEST = "latest_checkpointed_iteration.txt"
BEST = "best_checkpointed_iteration.txt"
LOCK = ".pn-train.lock"
BASE_KEY = "lora_base"  # an adapter checkpoint's frozen base: {path, sha256} (lora.base_record)


class CheckpointError(UserError):
    """A checkpoint that is missing, damaged or does not fit the run."""


class SaveFailed(CheckpointError):
    """A save that did not complete (its partial directory removed, `latest` untouched)."""
    exit_code = 1


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
    """False for model-only checkpoints (pn-project, pn-import-hf) and for one saved before the
    first optimizer step (a fine-tuning's step-0 candidate): its optimizer holds no state yet,
    its model weights are all there is to start from. A DeepSpeed engine's checkpoint (not a
    dist_checkpointing directory) always holds one."""
    if not (Path(path) / "metadata.json").is_file():
        return True
    common = dist_checkpointing.load_common_state_dict(str(path))
    return "scheduler" in common and common.get("iteration", 0) > 0


def saved_config(path: str | Path):
    """The run config stored in a checkpoint (a root or one iteration directory)."""
    from megatron_pn.config import config_from_dict

    common = dist_checkpointing.load_common_state_dict(str(resolve(path)))
    if "config" not in common:
        raise CheckpointError(f"{path}: no run config in this checkpoint")
    return config_from_dict(common["config"], f"checkpoint {path}")


# ---------------------------------------------------------------------------------------------
# One run per directory; damaged iterations


class DirLock:
    """An exclusive lock on a checkpoint directory for the life of a run: `flock` on ROOT/LOCK,
    which records the holder's pid and host. The kernel drops it when the process ends, however
    it ends (crash, kill -9); `release` drops it earlier."""

    def __init__(self, root: str | Path):
        self.path = Path(root) / LOCK
        self.fd: int | None = None

    def acquire(self) -> str | None:
        """Raises CheckpointError when another run holds the lock; returns a warning when this
        file system cannot lock (the run goes on unlocked)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode(errors="replace").strip()
            os.close(fd)
            raise CheckpointError(
                f"checkpoint.dir {self.path.parent} is in use by another run "
                f"({holder or 'starting up'}; {self.path}) — wait for it to end or stop it, or "
                "give this run another checkpoint.dir") from None
        except OSError as err:  # ENOLCK, EOPNOTSUPP: e.g. Lustre mounted without flock
            os.close(fd)
            return (f"checkpoint.dir {self.path.parent}: cannot lock {self.path} "
                    f"({err.strerror}): nothing stops a second run from using this directory")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
        self.fd = fd
        return None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the file drops the flock
            self.fd = None


def damage(path: str | Path) -> str | None:
    """Why the iteration at `path` cannot be resumed from, in a few words; None when it looks
    intact. Reads metadata and file sizes, not the tensors."""
    path = Path(path)
    if not path.is_dir():
        return "its directory is missing"
    if not (path / "metadata.json").is_file():
        return _deepspeed_damage(path)
    try:
        json.loads((path / "metadata.json").read_text())
        if not (path / ".metadata").is_file():
            return ".metadata is missing"
        from torch.distributed.checkpoint import FileSystemReader

        storage = FileSystemReader(str(path)).read_metadata().storage_data
    except Exception as err:  # noqa: BLE001 - any unreadable metadata is damage
        return f"its metadata is unreadable ({type(err).__name__})"
    needed: dict[str, int] = {}
    for info in storage.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0),
                                         info.offset + info.length)
    for name, size in sorted(needed.items()):
        shard = path / name
        if not shard.is_file():
            return f"shard {name} is missing"
        if shard.stat().st_size < size:
            return f"shard {name} is truncated ({shard.stat().st_size} of {size} bytes)"
    try:
        dist_checkpointing.load_common_state_dict(str(path))
    except Exception as err:  # noqa: BLE001
        return f"its common state (common.pt) is unreadable ({type(err).__name__})"
    return None


def _deepspeed_damage(path: Path) -> str | None:
    files = sorted(path.glob("*.pt"))
    if not any(f.name.endswith("model_states.pt") for f in files):
        return "it holds neither metadata.json nor DeepSpeed model states"
    for f in files:  # torch.save writes zip archives: a truncated one loses its directory
        if not zipfile.is_zipfile(f):
            return f"{f.name} is truncated or unreadable"
    return None


def newest_intact(root: str | Path) -> tuple[int | None, list[str]]:
    """The step to resume from — the one `latest` names, or when that iteration is damaged the
    newest intact one before it — and a note for each damaged iteration passed over."""
    root = Path(root)
    marker = root / LATEST
    if not marker.is_file():
        return None, []
    text = marker.read_text().strip()
    named = int(text) if text.isdigit() else None
    notes = [] if named is not None else [f"{LATEST} names '{text}', not a step"]
    saved = {int(p.name[5:]) for p in root.glob("iter_*") if p.name[5:].isdigit()}
    steps = {s for s in saved if named is None or s < named} | ({named} - {None})
    for step in sorted(steps, reverse=True):
        reason = damage(iteration_dir(root, step))
        if reason is None:
            return step, notes
        notes.append(f"{iteration_dir(root, step).name}: {reason}")
    return None, notes


def resume_step(root: str | Path, on_damaged: str = "fallback") -> tuple[int | None, str | None]:
    """The step a run in `root` resumes from (None: step 0) and, when a damaged iteration was
    passed over, a warning saying so. With on_damaged="stop", or when no intact iteration is
    left, a damaged one is a CheckpointError instead."""
    step, damaged = newest_intact(root)
    if not damaged:
        return step, None
    what = f"damaged checkpoint in {root}: {'; '.join(damaged)}"
    if step is None:
        raise CheckpointError(f"{what}; no intact iteration is left (checkpoint.dir) — restore "
                              "the files, or move the directory away to start from step 0")
    intact = iteration_dir(root, step).name
    if on_damaged == "stop":
        raise CheckpointError(f"{what} (checkpoint.dir) — delete it to resume from {intact}, the "
                              "newest intact iteration, or set checkpoint.on_damaged=fallback")
    return step, (f"{what} (checkpoint.dir) — resuming from {intact}, the newest intact "
                  "iteration (checkpoint.on_damaged=stop refuses instead)")


RUNTIME_ONLY = {"attention_backend", "fusions", "hidden_dropout", "attention_dropout",
                "init_method_std", "code_init", "code_init_spread"}  # no parameter shapes


SHAPES = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
          "ffn_hidden_size", "activation", "normalization", "add_bias_linear",
          "position_embedding_type", "tie_embeddings", "vocab_size")  # of any model type


def model_differences(path: str | Path, model, keys=None) -> list[str]:
    """The model keys (default: all but RUNTIME_ONLY) whose value in the checkpoint at `path`
    differs from `model`'s (empty when the checkpoint stores no readable config)."""
    import dataclasses

    try:
        saved = saved_config(path).model
    except Exception:  # noqa: BLE001 - only a hint for an error message
        return []
    keys = keys or [f.name for f in dataclasses.fields(saved) if f.name not in RUNTIME_ONLY]
    return [f"model.{key} {getattr(saved, key)!r} in the checkpoint, {getattr(model, key)!r} "
            "here" for key in keys if getattr(saved, key) != getattr(model, key)]


def shape_differences(path: str | Path, model) -> list[str]:
    """model_differences in the keys that shape parameters: a checkpoint the model cannot
    load (a mix or projected expert still loads into a dense model of its shape; two models
    of one family compare the family's own shape keys too, e.g. a PN's k, h and m)."""
    from megatron_pn.families import family_of

    try:
        saved = saved_config(path).model
    except Exception:  # noqa: BLE001 - no readable config: nothing to compare
        return []
    family = family_of(model)
    same_family = family is family_of(saved)
    return model_differences(path, model, SHAPES + (family.shape_keys if same_family else ()))


def why_failed(err: BaseException) -> str:
    """A failed save or load in a few words: the OS error under it (a full disk named as such),
    else the first line of the innermost exception."""
    seen, queue = set(), [err]
    while queue:
        e = queue.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno:
            if e.errno == errno.ENOSPC:
                return "disk full (ENOSPC)"
            if e.errno == errno.EDQUOT:
                return "disk quota exceeded (EDQUOT)"
            where = f" ({e.filename})" if e.filename else ""
            return f"{e.strerror or e} ({errno.errorcode.get(e.errno, e.errno)}){where}"
        if isinstance(e, CheckpointException):  # torch's: every rank's exception inside
            queue += [exc for exc, _ in e.failures.values()]
        queue += [e.__cause__, e.__context__]
    inner = err
    if isinstance(err, CheckpointException) and err.failures:
        inner = next(iter(err.failures.values()))[0]
    text = str(inner).strip().splitlines()
    return f"{type(inner).__name__}: {text[0] if text else ''}".rstrip(": ")


def _out_of_space(root: Path, previous: str | None) -> bool:
    """Whether checkpoint.dir's disk has no room left for another checkpoint (the previous
    one's size; 1 MiB without one): a failed writer does not always say ENOSPC."""
    if "No space left on device" in traceback.format_exc():
        return True
    done = iteration_dir(root, int(previous)) if previous else None
    needed = sum(f.stat().st_size for f in done.rglob("*") if f.is_file()) if done else 2**20
    return shutil.disk_usage(root).free < needed


def save_phase(root: Path, step: int, phase, partial: Path) -> None:
    """Run one phase of a save on every rank. When it failed on any rank, the partial
    iteration directory is removed and every rank raises SaveFailed saying why; `latest` still
    names the previous complete save."""
    def run():
        try:
            return phase()
        except (Exception, CheckpointException) as err:
            previous = (root / LATEST).read_text().strip() if (root / LATEST).is_file() else None
            reason = why_failed(err)
            if "ENOSPC" not in reason and _out_of_space(root, previous):
                reason = f"disk full (ENOSPC): {reason}"  # the writer's own words vary
            todo = ("free space on that disk or set checkpoint.dir elsewhere"
                    if "ENOSPC" in reason or "EDQUOT" in reason else "fix the cause")
            resume = f"resumes from step {previous}" if previous else "starts again"
            raise SaveFailed(
                f"saving checkpoint step {step} failed on {socket.gethostname()} (rank "
                f"{dist.get_rank()}): {reason} ({root}) — its partial "
                f"directory was removed and {LATEST} is unchanged; {todo}, then rerun "
                f"(it {resume})") from None

    try:
        agreed(run)
    except SaveFailed:
        if dist.get_rank() == 0:
            shutil.rmtree(partial, ignore_errors=True)
        dist.barrier()
        raise


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


def _model_state(chunks, keep=None) -> dict:
    """The chunks' sharded state dicts, or their entries whose key `keep` accepts."""
    states = {key: _unwrap(chunk).sharded_state_dict()
              for key, chunk in zip(_model_keys(chunks), chunks)}
    if keep is None:
        return states
    return {key: {k: v for k, v in state.items() if keep(k)} for key, state in states.items()}


def _saved_part(chunks):
    """What a save writes of the model: all of it, or, with LoRA adapters, the adapters alone
    (the frozen base is the checkpoint BASE_KEY names)."""
    from megatron_pn.lora import has_adapters, is_adapter

    return is_adapter if has_adapters(_unwrap(chunks[0])) else None


def _load_base(path: Path, record: dict, chunks) -> None:
    """The frozen base of an adapter checkpoint into the chunks, checked to be the one its
    adapters were trained on."""
    from megatron_pn.lora import fingerprint, has_adapters

    base = Path(record["path"])
    if not has_adapters(_unwrap(chunks[0])):
        raise CheckpointError(f"{path} holds LoRA adapters (finetune.lora), and this model has "
                              "none — merge them into a dense checkpoint first (pn-merge-lora)")
    if not base.is_dir() or damage(base):
        raise CheckpointError(f"{path}: the base checkpoint its LoRA adapters were trained on, "
                              f"{base}, is missing or damaged — restore it there")
    if fingerprint(base) != record["sha256"]:
        raise CheckpointError(f"{path}: the base checkpoint {base} has changed since its LoRA "
                              "adapters were trained on it (sha256 differs) — restore that base")
    load(base, chunks)


def _optimizer_metadata(optimizer_format: str) -> dict:
    return {"distrib_optim_sharding_type": optimizer_format}


# ---------------------------------------------------------------------------------------------
# Save / load


def _writer_queue_deaf_to_stop_signals() -> None:
    """Start dist_checkpointing's write-results queue (a Manager server process, spawned at the
    first save and reused) with SIGUSR1 and SIGTERM blocked, which its process inherits. A job
    step's stop signal reaches every process of the step (slurmstepd), and this one died of
    it: the stop's own save then failed (measured: EOFError). Blocked, not ignored: a signal
    arriving meanwhile is delivered to us once they are unblocked."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is not None:
        return
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGTERM})
    try:
        filesystem_async._get_write_results_queue()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def save(root, step: int, chunks, optimizer=None, scheduler=None, extra: dict | None = None,
         optimizer_format: str = "fully_reshardable", keep_last: int | None = None) -> Path:
    """Collective: every rank calls it. Returns the final iteration directory.

    Without an optimizer it writes model weights only (what `pn-project` produces and
    `checkpoint.load` reads)."""
    _writer_queue_deaf_to_stop_signals()
    root = Path(root)
    final = iteration_dir(root, step)
    tmp = root / f".tmp_{final.name}"

    def prepare():
        if dist.get_rank() == 0:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()

    def publish():
        if dist.get_rank() == 0:
            if final.exists():
                shutil.rmtree(final)
            # not pn_base.fileio.atomic_path: every rank writes into tmp (dist_checkpointing)
            # between prepare and publish, so the directory is named before the save starts
            tmp.rename(final)
            atomic_write_text(root / LATEST, f"{step}\n")
            _prune(root, keep_last)

    save_phase(root, step, prepare, tmp)
    metadata = _optimizer_metadata(optimizer_format)
    state = _model_state(chunks, _saved_part(chunks))
    if optimizer is not None:
        compat.prepare_optimizer_state(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=False,
                                                          metadata=metadata)
        state["scheduler"] = scheduler.state_dict()
        state["rng_state"] = _rng_state()
    state["iteration"] = step
    state["layout"] = _layout()
    state.update(extra or {})
    save_phase(root, step, lambda: dist_checkpointing.save(state, str(tmp),
                                                           content_metadata=metadata), tmp)
    save_phase(root, step, publish, tmp)
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
    An adapter checkpoint loads its base first (BASE_KEY), then its adapters; a dense one into
    a model with adapters fills all but the adapters.
    """
    from megatron_pn.lora import has_adapters, is_adapter

    common = dist_checkpointing.load_common_state_dict(str(path))
    record, keep = common.get(BASE_KEY), None
    if record is not None:
        _load_base(path, record, chunks)
        keep = is_adapter
    elif has_adapters(_unwrap(chunks[0])):
        keep = lambda key: not is_adapter(key)  # noqa: E731 - the adapters start fresh
    template = _model_state(chunks, keep)
    if optimizer is not None:
        metadata = dist_checkpointing.load_content_metadata(str(path)) or {}
        compat.prepare_optimizer_state(optimizer)
        template["optimizer"] = optimizer.sharded_state_dict(
            template, is_loading=True, metadata=metadata
        )
        if common.get("layout") == _layout():
            template["rng_state"] = _rng_state()
    state = dist_checkpointing.load(template, str(path))

    for key, chunk in zip(_model_keys(chunks), chunks):
        _unwrap(chunk).load_state_dict(state[key], strict=keep is None)
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if "rng_state" in template:
            set_rng_states(state["rng_state"])
    return {k: v for k, v in state.items() if k not in template and k != "scheduler"}
