"""Checkpoint tools' process world: a model of any saved TP/PP layout loaded for inference
(pn-eval, pn-export-hf, pn-import-hf, pn-project), in one process or with TP over torchrun."""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from pathlib import Path

import torch

from pn_base.errors import UserError


class ToolError(UserError):
    """Bad input to a checkpoint tool (reported as one clear line)."""


# ---------------------------------------------------------------------------------------------
# A process world for inference


@contextlib.contextmanager
def inference_world(single_process: bool = False):
    """Process groups with one pipeline stage and TP over all processes; yields the DistEnv.

    Reuses a world that is already set up (a caller's, e.g. a test's) and tears down only what
    it created.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_pn import compat
    from megatron_pn.distributed import init_distributed

    device_type = compat.activate()
    owns_dist = not dist.is_initialized()
    env = init_distributed(device_type)
    owns_parallel = not ps.model_parallel_is_initialized()
    try:
        if single_process and env.world_size != 1:
            raise ToolError("this command runs as one process (it loads any TP/PP layout by "
                            "itself); run it without torchrun")
        if owns_parallel:
            ps.initialize_model_parallel(tensor_model_parallel_size=env.world_size)
        elif ps.get_pipeline_model_parallel_world_size() != 1:
            raise ToolError("inference needs a world without pipeline parallelism")
        yield env
    finally:
        if owns_parallel and ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        if owns_dist and dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Loading a checkpoint into this world


@dataclass
class LoadedModel:
    model: torch.nn.Module  # a GPTModel (dense, mix) or PNGPTModel (pn), eval mode
    cfg: object  # the run's Config, with this world's parallel layout
    path: Path  # the iteration directory
    iteration: int | None
    device: torch.device

    @property
    def family(self):
        from megatron_pn.families import family_of

        return family_of(self.cfg)


def resolve_checkpoint(path: str | Path) -> Path:
    from megatron_pn import checkpoint

    if not Path(path).exists():
        raise ToolError(f"checkpoint {path} does not exist")
    return checkpoint.resolve(path)


def inference_config(saved, tensor: int, precision: str):
    """The run's config with every layer in this process (one stage) and no dropout."""
    from megatron_pn.config import ParallelConfig

    cfg = copy.deepcopy(saved)
    cfg.parallel = ParallelConfig(tensor=tensor)
    cfg.train.precision = precision
    cfg.model.hidden_dropout = cfg.model.attention_dropout = 0.0
    return cfg


def load_model(checkpoint_path: str | Path, env, precision: str = "fp32") -> LoadedModel:
    """Build the checkpoint's model at this world's TP size and load its weights (any layout)."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from megatron_pn import checkpoint
    from megatron_pn.model import build_model
    from megatron_pn.checks import check_model, check_parallel

    path = resolve_checkpoint(checkpoint_path)
    tensor = ps.get_tensor_model_parallel_world_size()
    cfg = inference_config(checkpoint.saved_config(path), tensor, precision)
    check_model(cfg)
    check_parallel(cfg, tensor, env.device.type)
    tensor_parallel.model_parallel_cuda_manual_seed(cfg.train.seed)
    [model] = build_model(cfg, env.device.type, initialize=False)  # weights: the checkpoint's
    common = checkpoint.load(path, [model])
    return LoadedModel(model.eval(), cfg, path, common.get("iteration"), env.device)


# ---------------------------------------------------------------------------------------------
# LoRA adapters merged


def merge_adapters(checkpoint_path: str | Path, output: str | Path,
                   overwrite: bool = False) -> Path:
    """pn-merge-lora: an adapter checkpoint (finetune.lora) as a plain dense checkpoint, each
    adapted weight W + (alpha / r) B A (lora.merged_state), written atomically; returns it."""
    from megatron.core import dist_checkpointing

    from megatron_pn import checkpoint
    from megatron_pn.model import build_model
    from megatron_pn.run_tokenizer import checkpoint_fingerprint
    from pn_base.fileio import atomic_path, check_writable

    check_writable(output, overwrite)
    path = resolve_checkpoint(checkpoint_path)
    base = dist_checkpointing.load_common_state_dict(str(path)).get(checkpoint.BASE_KEY)
    if base is None:
        raise ToolError(f"--checkpoint {path} holds no LoRA adapters (finetune.lora): it is a "
                        "dense checkpoint already")
    trained = checkpoint_fingerprint(path)
    with inference_world(single_process=True) as env:
        loaded = load_model(path, env)
        dense_cfg = loaded.family.dense_run_config(loaded.cfg)
        [dense] = build_model(dense_cfg, env.device.type, initialize=False)
        missing, unexpected = dense.load_state_dict(loaded.family.dense_state(loaded.model),
                                                    strict=False)
        missing = [key for key in missing if not key.endswith("_extra_state")]
        if missing or unexpected:  # a weight left out would stay uninitialized memory
            raise RuntimeError(f"the merged state does not fit the dense model: missing "
                               f"{missing[:3]}, unexpected {unexpected[:3]}")
        with atomic_path(output, overwrite) as tmp:
            checkpoint.save(tmp, 0, [dense], extra={
                "consumed_samples": 0, "config": dense_cfg.to_dict(),
                "merged_lora": {"adapters": str(path), "base": base},
                "tokenizer": trained.record() if trained else None})
    return Path(output)
