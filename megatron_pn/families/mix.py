"""SLM-mix (the paper's hard mixture): k independent dense SLMs, expert i pretrained only on
cluster i. One config serves all k jobs; `data.expert=i` picks the job (a SLURM array index).

    pn-train configs/paper/mix16.yaml data.expert=3
"""

from __future__ import annotations

import dataclasses

from megatron_pn.config import Config
from megatron_pn.families.dense import DenseFamily
from pn_base.errors import ConfigError, require
from pn_base.outputs import expert_dir


class MixFamily(DenseFamily):
    """A dense model per cluster: dense in every respect but its data and directories."""

    name = "mix"
    per_cluster_jobs = True
    eval_set_form = "[name, prefix] or [name, prefix, assign dir] (the expert's cluster only)"

    def check_eval_set(self, cfg: Config, entry) -> None:
        require(isinstance(entry, (list, tuple)) and
                (len(entry) == 2 or (len(entry) == 3 and isinstance(entry[2], str))),
                f"train.eval_sets: {entry!r} should be {self.eval_set_form}")

    def job_config(self, cfg: Config) -> Config:
        """The config of one expert: its cluster's datasets, its own run directories."""
        from megatron_pn.data import resolve_blend

        expert, k = cfg.data.expert, cfg.model.num_experts
        if expert is None or not 0 <= expert < k:
            raise ConfigError(f"model.type mix needs data.expert in [0, model.num_experts = {k}),"
                              f" got {expert}; run one job per expert")
        blend = resolve_blend(cfg.data)
        if blend.cluster_ids is None:
            raise ConfigError("model.type mix needs per-cluster datasets: set data.blend_file to "
                              "the generic_blend.json of `pn-data cluster`")
        chosen = [i for i, c in enumerate(blend.cluster_ids) if c == expert]
        if not chosen:
            raise ConfigError(f"data.expert {expert}: no dataset of that cluster in the blend "
                              "(an empty cluster has no expert to train)")
        entries = [[blend.weights[i], blend.prefixes[i]] if blend.weights else blend.prefixes[i]
                   for i in chosen]
        suffix = "/" + expert_dir(expert)
        data = dataclasses.replace(cfg.data, blend=entries, blend_file=None, cluster_ids=None)
        logging_ = dataclasses.replace(cfg.logging,
                                       run_dir=cfg.logging.run_dir.rstrip("/") + suffix)
        checkpoint = cfg.checkpoint
        if checkpoint.dir:
            checkpoint = dataclasses.replace(checkpoint, dir=checkpoint.dir.rstrip("/") + suffix)
        return dataclasses.replace(cfg, data=data, logging=logging_, checkpoint=checkpoint)

    def route_held_out(self, cfg: Config, held, route: list, window_clusters) -> None:
        """The windows of the expert's own cluster only (by an assign dir)."""
        held.windows = held.windows[window_clusters(route[0], held) == cfg.data.expert]
