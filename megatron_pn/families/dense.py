"""The dense GPT (SLM, LLM, SLM-is, SLM-d, a projected expert): megatron-core's local layer
spec (pure-torch modules, so CPU and GPU share one code path) or, by model.transformer_impl,
its Transformer Engine spec. Every other family builds on these layer specs."""

from __future__ import annotations

from megatron_pn.config import Config, ModelConfig
from megatron_pn.families.base import ModelFamily

ATTENTION_BACKENDS = ("sdpa", "local")  # model.attention_backend


def core_attention(backend: str) -> type:
    """The core-attention module of model.attention_backend: torch's SDPA or megatron-core's
    unfused DotProductAttention."""
    if backend == "sdpa":
        from megatron_pn.attention import SDPAttention

        return SDPAttention
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    return DotProductAttention


class DenseFamily(ModelFamily):
    name = "dense"
    takes_lora = True

    def decoder_spec(self, cfg: Config, tconfig, vp_stage: int | None):
        if cfg.finetune.lora.rank is None:
            return layer_spec(cfg)
        from megatron_pn.lora import with_adapters

        return with_adapters(layer_spec(cfg), cfg.finetune.lora)

    def model_class(self, cfg: Config) -> tuple[type, dict]:
        if cfg.finetune.lora.rank is None:
            return super().model_class(cfg)
        from megatron_pn.lora import LoRAGPTModel

        return LoRAGPTModel, {"lora_seed": cfg.train.seed}

    def dense_state(self, model, weights=None) -> dict:
        """A model with LoRA adapters: the dense model with them merged into its weights."""
        from megatron_pn.lora import has_adapters, merged_state

        return merged_state(model) if has_adapters(model) else model.state_dict()


def uses_transformer_engine(model: ModelConfig, supports_te: bool) -> bool:
    """model.transformer_impl resolved: `auto` takes TE where the family and device allow."""
    from megatron_pn import compat

    if model.transformer_impl == "auto":
        return supports_te and compat.transformer_engine_available()
    return model.transformer_impl == "transformer_engine"


def with_core_attention(spec, backend: str):
    """A local-spec layer (a ModuleSpec) with its core attention by model.attention_backend."""
    spec.submodules.self_attention.submodules.core_attention = core_attention(backend)
    return spec


def layer_spec(cfg: Config):
    """A dense layer: megatron-core's local spec (or TE's, by model.transformer_impl)."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec, get_gpt_layer_with_transformer_engine_spec)

    m = cfg.model
    # TE's own fused attention, norms, linears; LoRA adapters extend the local linears
    if uses_transformer_engine(m, supports_te=cfg.finetune.lora.rank is None):
        return get_gpt_layer_with_transformer_engine_spec()
    spec = get_gpt_layer_local_spec(normalization=m.normalization)
    return with_core_attention(spec, m.attention_backend)
