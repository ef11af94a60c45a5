"""A model in a single process (any device): for tools that read checkpoints (projection,
evaluation, export) rather than train. Checkpoints of any TP/PP layout load here at TP=PP=1."""

from __future__ import annotations

import dataclasses

import torch

from megatron_pn import checkpoint, compat
from megatron_pn.config import Config


def single_process(cfg: Config) -> Config:
    return dataclasses.replace(cfg, parallel=dataclasses.replace(
        cfg.parallel, tensor=1, pipeline=1, virtual_pipeline=None, sequence_parallel=False,
        distributed_optimizer=False))


def standalone_world(cfg: Config):
    """Process group and megatron-core parallel state for one process; returns
    (device, TransformerConfig for `cfg` at TP=PP=1)."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from megatron_pn.distributed import init_distributed
    from megatron_pn.model import transformer_config

    device_type = compat.activate()
    env = init_distributed(device_type)
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(1, 1)
        tensor_parallel.model_parallel_cuda_manual_seed(cfg.train.seed)
    return env.device, transformer_config(single_process(cfg), device_type)


def standalone_model(cfg: Config, tconfig, path) -> torch.nn.Module:
    """The model of `cfg` with the weights saved at `path`, in eval mode."""
    from megatron_pn.model import build_model_chunks

    model = build_model_chunks(single_process(cfg), tconfig)[0]
    if torch.cuda.is_available():
        model = model.cuda()
    checkpoint.load(checkpoint.resolve(path), [model])
    return model.eval()
