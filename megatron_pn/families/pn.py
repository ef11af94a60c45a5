"""SLM-pn, projected networks (`model.type: pn`): the MLP linears of megatron-core's local layer
spec replaced by projected ones (megatron_pn/pn/: the equation, the spec, PNGPTModel). Every row
is computed by its cluster's expert: batches carry cluster ids from the per-cluster blend, each
expert is projected once per optimizer step (and evaluation), the step's projections are
backpropagated before the gradient reduction."""

from __future__ import annotations

import functools
import math

import numpy as np

from megatron_pn.config import Config
from megatron_pn.families.base import ModelFamily
from megatron_pn.families.dense import with_core_attention
from pn_base.errors import require


def pn_config(cfg: Config):
    """The PN layers' settings (megatron_pn.pn.PNConfig) of a run."""
    from megatron_pn.pn import PNConfig

    m = cfg.model
    return PNConfig(num_experts=m.num_experts, bank_size=m.bank_size, code_size=m.code_size,
                    seed=cfg.train.seed, code_init=m.code_init,
                    code_init_spread=m.code_init_spread)


class PNFamily(ModelFamily):
    name = "pn"
    routed = True
    projectable = True
    shape_keys = ("num_experts", "bank_size", "code_size", "project_attention")
    eval_set_form = "[name, prefix, expert or assign dir]"
    supports_te = False

    def check_config(self, cfg: Config) -> None:
        super().check_config(cfg)
        m = cfg.model
        require(m.num_experts >= 1,
                f"model.num_experts must be >= 1 for model.type pn, got {m.num_experts}")
        require(m.bank_size >= 1,
                f"model.bank_size (h) must be >= 1 for model.type pn, got {m.bank_size}")
        require(m.code_init in ("random", "shared"),
                f"model.code_init must be random or shared, got {m.code_init!r}")
        require(1 <= m.code_size <= m.bank_size,
                f"model.code_size (m) {m.code_size} must be in [1, model.bank_size "
                f"{m.bank_size}]: codes are projected to h mixing weights, so m > h adds nothing")
        require(not m.add_bias_linear, "model.type pn needs model.add_bias_linear=false")
        require(not cfg.parallel.sequence_parallel,
                "model.type pn does not support sequence_parallel")

    def check_data(self, cfg: Config, blend) -> None:
        require(blend.cluster_ids is not None,
                "model.type pn needs the cluster id of every training sequence: set "
                "data.blend_file to the generic_blend.json of `pn-data cluster` (or list "
                "per-cluster prefixes in data.blend with data.cluster_ids)")
        require(not cfg.data.valid_blend, "data.valid_blend: not supported for model.type pn "
                                          "(validation uses data.split of the per-cluster "
                                          "datasets)")
        bad = [c for c in blend.cluster_ids if not 0 <= c < cfg.model.num_experts]
        require(not bad, f"data.cluster_ids: {bad[:5]} outside [0, model.num_experts = "
                         f"{cfg.model.num_experts})")

    def data_warnings(self, cfg: Config, blend) -> list[str]:
        """Experts whose cluster has no (weighted) dataset in the blend train on nothing."""
        if blend.cluster_ids is None:
            return []
        weights = blend.weights or [1.0] * len(blend.prefixes)
        fed = {c for c, w in zip(blend.cluster_ids, weights) if w > 0}
        idle = [e for e in range(cfg.model.num_experts) if e not in fed]
        if not idle:
            return []
        shown = ", ".join(map(str, idle[:20])) + (", ..." if len(idle) > 20 else "")
        return [f"expert{'s' if len(idle) > 1 else ''} {shown} of model.num_experts "
                f"{cfg.model.num_experts} get{'' if len(idle) > 1 else 's'} no training data "
                "from the blend (data.blend_file / data.cluster_ids): trained on nothing, "
                "keeping the initial codes — lower model.num_experts or add the clusters' data "
                "unless that is what you mean"]

    def check_eval_set(self, cfg: Config, entry) -> None:
        require(isinstance(entry, (list, tuple)) and len(entry) == 3,
                f"train.eval_sets: {entry!r} should be {self.eval_set_form}")
        if not isinstance(entry[2], str):
            require(isinstance(entry[2], int) and 0 <= entry[2] < cfg.model.num_experts,
                    f"train.eval_sets: expert {entry[2]!r} of {entry[0]} outside "
                    f"[0, model.num_experts = {cfg.model.num_experts})")

    # -- the model -----------------------------------------------------------------------------

    def decoder_spec(self, cfg: Config, tconfig, vp_stage: int | None):
        """One spec per layer: each seeds its projected weights by its global layer number."""
        from megatron_pn.pn import pn_block_spec

        m = cfg.model
        block = pn_block_spec(tconfig, m.normalization, pn_config(cfg), m.project_attention,
                              vp_stage)
        for spec in block.layer_specs:
            with_core_attention(spec, m.attention_backend)
        return block

    def model_class(self, cfg: Config) -> tuple[type, dict]:
        from megatron_pn.pn import PNGPTModel

        return PNGPTModel, {"pn": pn_config(cfg)}

    def expert_parameters(self, chunks: list, total: int) -> int:
        """The shared parameters of the `total` plus one dense matrix per bank."""
        from megatron_pn.pn.layers import ProjectedLinear

        for chunk in chunks:
            total -= chunk.expert_codes.numel()
            for module in chunk.modules():
                if isinstance(module, ProjectedLinear):
                    total += math.prod(module.full_shape) - module.bank.numel()
                    total -= module.code_projection.numel()
        return total

    # -- training ------------------------------------------------------------------------------

    def routing_table(self, cfg: Config):
        """The cluster of each blend entry (a tensor: a sample's `dataset_id` indexes it)."""
        import torch

        from megatron_pn.data import resolve_blend

        return torch.tensor(resolve_blend(cfg.data).cluster_ids)

    def batch_routing(self, batch: dict, table) -> dict:
        """The expert of each row, on the host (the model groups the rows itself)."""
        from megatron_pn.data import cluster_ids_of

        return {"cluster_ids": cluster_ids_of(batch, table)}

    def step_experts(self, batches: list[dict], table) -> set:
        import torch

        from megatron_pn.data import cluster_ids_of

        return set(torch.cat([cluster_ids_of(b, table) for b in batches]).tolist())

    def step_scope(self, cfg: Config, model_chunks):
        """Each expert projected once for all the step's micro-batches (train.
        pn_project_once_per_step), else once per micro-batch and linear."""
        from megatron_pn.pn import projected_once

        if not cfg.train.pn_project_once_per_step:
            return super().step_scope(cfg, model_chunks)
        return functools.partial(projected_once, model_chunks)

    def eval_scope(self, model_chunks):
        from megatron_pn.pn import projected_once

        return projected_once(model_chunks, backprop=False)

    def finalize_grads(self, model_chunks, num_tokens=None, **kwargs) -> None:
        """The step's projections backpropagated, megatron-core's finalization, then the
        expert codes' cross-stage reduction (pn/model.py)."""
        from megatron_pn.pn import finalize_pn_model_grads

        finalize_pn_model_grads(model_chunks, num_tokens, **kwargs)

    def lr_overrides(self, train) -> dict[str, dict]:
        """train.pn_bank_lr_mult x the run's LR schedule for the banks."""
        if train.pn_bank_lr_mult == 1.0:
            return {}
        return {"*.bank": {"max_lr": train.lr * train.pn_bank_lr_mult,
                           "min_lr": train.min_lr * train.pn_bank_lr_mult}}

    # -- evaluation, projection, export --------------------------------------------------------

    def route_held_out(self, cfg: Config, held, route: list, window_clusters) -> None:
        """Each window by its cluster (an assign dir of `pn-data assign`) or one expert."""
        if isinstance(route[0], str):
            held.cluster_ids = window_clusters(route[0], held)
        else:
            held.cluster_ids = np.full(len(held.windows), route[0], dtype=np.int64)

    def dense_state(self, model, expert: int | None) -> dict:
        from megatron_pn.pn.projection import dense_state_dict

        return dense_state_dict(model, expert)
