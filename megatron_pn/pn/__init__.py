"""Projected networks (SLM-pn): one large network whose MLP weights are linear projections of
per-layer banks, one small expert per cluster. See layers.py for the equation."""

from megatron_pn.pn.layers import ExpertRouting, PNConfig
from megatron_pn.pn.model import PNGPTModel, finalize_pn_model_grads, projected_once
from megatron_pn.pn.spec import pn_block_spec

__all__ = ["ExpertRouting", "PNConfig", "PNGPTModel", "finalize_pn_model_grads", "pn_block_spec",
           "projected_once"]
