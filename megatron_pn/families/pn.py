"""SLM-pn, projected networks (`model.type: pn`): the MLP linears of megatron-core's local layer
spec replaced by projected ones (megatron_pn/pn/: the equation, the spec, PNGPTModel). Every row
is computed by its cluster's expert: batches carry cluster ids from the per-cluster blend, each
expert is projected once per optimizer step (and evaluation), the step's projections are
backpropagated in its last micro-batch's backward, before the gradient reduction (megatron-core;
DeepSpeed ZeRO-1/2: engines.py)."""

from __future__ import annotations

import functools
import math

from megatron_pn.config import Config
from megatron_pn.families.base import RoutedFamily
from megatron_pn.families.dense import with_core_attention
from pn_base.errors import require


def pn_config(cfg: Config):
    """The PN layers' settings (megatron_pn.pn.PNConfig) of a run."""
    from megatron_pn.pn import PNConfig

    m = cfg.model
    return PNConfig(num_experts=m.num_experts, bank_size=m.bank_size, code_size=m.code_size,
                    seed=cfg.train.seed, code_init=m.code_init,
                    code_init_spread=m.code_init_spread, code_map=m.code_map,
                    code_map_hidden=m.code_map_hidden, grouped_gemm=cfg.train.pn_grouped_gemm)


class PNFamily(RoutedFamily):
    name = "pn"
    shape_keys = ("num_experts", "bank_size", "code_size", "project_attention", "code_map",
                  "code_map_hidden")
    supports_te = False
    mixture_trainable = True

    def check_config(self, cfg: Config) -> None:
        super().check_config(cfg)
        m = cfg.model
        require(m.bank_size >= 1,
                f"model.bank_size (h) must be >= 1 for model.type pn, got {m.bank_size}")
        require(m.code_init in ("random", "shared"),
                f"model.code_init must be random or shared, got {m.code_init!r}")
        require(1 <= m.code_size <= m.bank_size,
                f"model.code_size (m) {m.code_size} must be in [1, model.bank_size "
                f"{m.bank_size}]: codes are projected to h mixing weights, so m > h adds nothing")
        require(not m.add_bias_linear, "model.type pn needs model.add_bias_linear=false")
        require(m.code_map in ("linear", "learned"),
                f"model.code_map must be linear or learned, got {m.code_map!r}")

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
            total -= sum(p.numel() for _, p in chunk.code_parameters())
            for module in chunk.modules():
                if isinstance(module, ProjectedLinear):
                    total += math.prod(module.full_shape) - module.bank.numel()
                    total -= module.code_projection.numel()
        return total

    # -- training ------------------------------------------------------------------------------

    def batch_routing(self, batch: dict, table) -> dict:
        """Each row's cluster, or (mixture training) the micro-batch's one mixture."""
        if "mixture" in batch:
            return {"mixture": batch["mixture"][0]}
        return super().batch_routing(batch, table)

    def step_experts(self, batches: list[dict], table) -> set:
        import torch

        from megatron_pn.data import cluster_ids_of

        if "mixture" in batches[0]:  # the mixture of each micro-batch (ExpertRouting's keys)
            return {tuple(b["mixture"][0].tolist()) for b in batches}
        return set(torch.cat([cluster_ids_of(b, table) for b in batches]).tolist())

    def step_scope(self, cfg: Config, model_chunks, late_gradients: bool):
        """Each expert projected once for all the step's micro-batches, else once per
        micro-batch and linear (`projects_once_per_step`)."""
        from megatron_pn.pn import projected_once

        if not self.projects_once_per_step(cfg, late_gradients):
            return super().step_scope(cfg, model_chunks, late_gradients)
        return functools.partial(projected_once, model_chunks)

    @staticmethod
    def projects_once_per_step(cfg: Config, late_gradients: bool) -> bool:
        """train.pn_project_once_per_step, where the engine takes late gradients: the banks,
        codes and projections get theirs in the step's last micro-batch only."""
        return cfg.train.pn_project_once_per_step and late_gradients

    def compute_note(self, cfg: Config, late_gradients: bool, device_type: str, dtype) -> str:
        """How often the experts are projected, and how their GEMMs run (compat.grouped_gemm)."""
        import torch

        from megatron_pn import compat

        once = self.projects_once_per_step(cfg, late_gradients)
        mode = cfg.train.pn_grouped_gemm
        grouped = compat.grouped_gemm(mode, torch.device(device_type), dtype)
        return (f"pn: experts projected once per {'optimizer step' if once else 'micro-batch'}; "
                f"per-expert GEMMs {'grouped (torch._grouped_mm)' if grouped else 'in a loop'} "
                f"(train.pn_grouped_gemm={mode}, {device_type}, {str(dtype).split('.')[-1]})")

    def eval_scope(self, model_chunks):
        from megatron_pn.pn import projected_once

        return projected_once(model_chunks)

    def finalize_grads(self, model_chunks, num_tokens=None, **kwargs) -> None:
        """megatron-core's finalization, then the expert codes' cross-stage reduction
        (pn/model.py)."""
        from megatron_pn.pn import finalize_pn_model_grads

        finalize_pn_model_grads(model_chunks, num_tokens, **kwargs)

    def lr_overrides(self, train) -> dict[str, dict]:
        """train.pn_bank_lr_mult x the run's LR schedule for the banks."""
        if train.pn_bank_lr_mult == 1.0:
            return {}
        return {"*.bank": {"max_lr": train.lr * train.pn_bank_lr_mult,
                           "min_lr": train.min_lr * train.pn_bank_lr_mult}}

    # -- evaluation, projection, export --------------------------------------------------------

    def dense_state(self, model, weights=None) -> dict:
        """Every projected matrix in closed form for the code of the cluster mixture `weights`
        (PNGPTModel.codes: sum_i weights[i] E[i], through the learned map if the model has
        one; one-hot weights: exactly the expert hard routing uses)."""
        from megatron_pn.pn.projection import dense_state_dict

        weights = tuple(float(w) for w in weights)
        if len(weights) != model.pn.num_experts:
            raise ValueError(f"{len(weights)} cluster weights for {model.pn.num_experts} "
                             "clusters")
        return dense_state_dict(model, code=model.codes((weights,))[0])
