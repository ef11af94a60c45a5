"""SLM-mix (the paper's hard mixture): k independent dense SLMs, expert i pretrained only on
cluster i. One config serves all k jobs; `data.expert=i` picks the job (a SLURM array index).

    pn-train configs/paper/mix16.yaml data.expert=3
"""

from __future__ import annotations

import dataclasses

from megatron_pn.config import Config
from megatron_pn.data import resolve_blend
from pn_base.errors import ConfigError
from pn_base.outputs import expert_dir


def expert_job(cfg: Config) -> Config:
    """The config of one SLM-mix expert: its cluster's datasets, its own run directories."""
    if cfg.model.type != "mix":
        return cfg
    expert, k = cfg.data.expert, cfg.model.num_experts
    if expert is None or not 0 <= expert < k:
        raise ConfigError(f"model.type mix needs data.expert in [0, model.num_experts = {k}), "
                          f"got {expert}; run one job per expert")
    blend = resolve_blend(cfg.data)
    if blend.cluster_ids is None:
        raise ConfigError("model.type mix needs per-cluster datasets: set data.blend_file to the "
                          "generic_blend.json of `pn-data cluster`")
    chosen = [i for i, c in enumerate(blend.cluster_ids) if c == expert]
    if not chosen:
        raise ConfigError(f"data.expert {expert}: no dataset of that cluster in the blend "
                          "(an empty cluster has no expert to train)")
    entries = [[blend.weights[i], blend.prefixes[i]] if blend.weights else blend.prefixes[i]
               for i in chosen]
    suffix = "/" + expert_dir(expert)
    data = dataclasses.replace(cfg.data, blend=entries, blend_file=None, cluster_ids=None)
    logging_ = dataclasses.replace(cfg.logging, run_dir=cfg.logging.run_dir.rstrip("/") + suffix)
    checkpoint = cfg.checkpoint
    if checkpoint.dir:
        checkpoint = dataclasses.replace(checkpoint, dir=checkpoint.dir.rstrip("/") + suffix)
    return dataclasses.replace(cfg, data=data, logging=logging_, checkpoint=checkpoint)
