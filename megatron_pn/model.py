"""The model: megatron-core `GPTModel` built from a layer spec.

`decoder_spec(cfg, ...)` is the seam where model families plug in: the dense SLM/LLM use
megatron-core's local layer spec (pure-torch modules, so CPU and GPU share one code path);
projected networks replace the MLP's linears in the same spec, one spec per layer (each seeds its
projected weights by its global layer number). Both get their core attention from `with_core_attention`
(SDPA by default). `build_model_chunks` returns one module per virtual pipeline stage of this rank.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (get_gpt_layer_local_spec,
                                                      get_gpt_layer_with_transformer_engine_spec)
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_pn import compat
from megatron_pn.attention import SDPAttention
from megatron_pn.config import Config, ModelConfig
from megatron_pn.pn import PNConfig, PNGPTModel, pn_block_spec

ACTIVATIONS = {"swiglu": (F.silu, True), "gelu": (F.gelu, False)}  # (function, gated)
CORE_ATTENTION = {"sdpa": SDPAttention, "local": DotProductAttention}


def padded_vocab_size(model: ModelConfig) -> int:
    """Vocabulary padded to a multiple of `make_vocab_size_divisible_by`.

    Unlike Megatron-LM we do not multiply the multiple by TP, so the embedding shape (and a
    checkpoint) is the same at every TP size; TP must divide the padded size (validated).
    """
    multiple = model.make_vocab_size_divisible_by
    return int(math.ceil(model.vocab_size / multiple) * multiple)


def params_dtype(cfg: Config, device_type: str) -> torch.dtype:
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if device_type == "cuda" else "fp32"
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]


def transformer_config(cfg: Config, device_type: str) -> TransformerConfig:
    m, p = cfg.model, cfg.parallel
    activation, gated = ACTIVATIONS[m.activation]
    dtype = params_dtype(cfg, device_type)
    on_gpu = device_type == "cuda"
    # megatron-core fuses GELU only with a bias (or gated); SwiGLU always. Off: its defaults.
    fusable = gated or m.add_bias_linear
    fusions = (compat.fusion_settings(device_type, dtype == torch.bfloat16, fusable)
               if m.fusions else {})
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        ffn_hidden_size=m.ffn_hidden_size,
        activation_func=activation,
        gated_linear_unit=gated,
        normalization=m.normalization,
        layernorm_epsilon=m.norm_epsilon,
        add_bias_linear=m.add_bias_linear,
        init_method_std=m.init_method_std,
        hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
        tensor_model_parallel_size=p.tensor,
        pipeline_model_parallel_size=p.pipeline,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline,
        sequence_parallel=p.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        # Loss is summed per token and normalized by the global token count, so the result is
        # independent of micro-batching and DP size.
        calculate_per_token_loss=True,
        **fusions,
        # Initialize full weights on the host then split: the same weights at any TP size.
        use_cpu_initialization=not on_gpu,
        perform_initialization=True,
    )


def pn_config(cfg: Config) -> PNConfig:
    m = cfg.model
    return PNConfig(num_experts=m.num_experts, bank_size=m.bank_size, code_size=m.code_size,
                    seed=cfg.train.seed, code_init=m.code_init,
                    code_init_spread=m.code_init_spread)


def uses_transformer_engine(model: ModelConfig) -> bool:
    """model.transformer_impl resolved: `auto` takes TE for a dense model where it is usable."""
    if model.transformer_impl == "auto":
        return model.type != "pn" and compat.transformer_engine_available()
    return model.transformer_impl == "transformer_engine"


def with_core_attention(spec: ModuleSpec, backend: str) -> ModuleSpec:
    """A local-spec layer with its core attention chosen by model.attention_backend."""
    spec.submodules.self_attention.submodules.core_attention = CORE_ATTENTION[backend]
    return spec


def layer_spec(cfg: Config) -> ModuleSpec:
    """A dense layer: megatron-core's local spec (or TE's, by model.transformer_impl)."""
    m = cfg.model
    if uses_transformer_engine(m):  # TE's own fused attention, norms and linears
        return get_gpt_layer_with_transformer_engine_spec()
    spec = get_gpt_layer_local_spec(normalization=m.normalization)
    return with_core_attention(spec, m.attention_backend)


def decoder_spec(cfg: Config, tconfig: TransformerConfig, vp_stage: int | None):
    """The decoder of one (virtual) pipeline stage: a layer spec, or PN's per-layer block spec."""
    m = cfg.model
    if m.type != "pn":
        return layer_spec(cfg)
    block = pn_block_spec(tconfig, m.normalization, pn_config(cfg), m.project_attention,
                          vp_stage)
    for spec in block.layer_specs:
        with_core_attention(spec, m.attention_backend)
    return block


def build_gpt(cfg: Config, tconfig: TransformerConfig, vp_stage: int | None = None) -> GPTModel:
    pre = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    post = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    model_class, extra = GPTModel, {}
    if cfg.model.type == "pn":
        model_class, extra = PNGPTModel, {"pn": pn_config(cfg)}
    return model_class(
        config=tconfig,
        transformer_layer_spec=decoder_spec(cfg, tconfig, vp_stage),
        vocab_size=padded_vocab_size(cfg.model),
        max_sequence_length=cfg.model.seq_length,
        pre_process=pre,
        post_process=post,
        share_embeddings_and_output_weights=cfg.model.tie_embeddings,
        position_embedding_type=cfg.model.position_embedding_type,
        rotary_base=cfg.model.rotary_base,
        vp_stage=vp_stage,
        **extra,
    )


def build_model_chunks(cfg: Config, tconfig: TransformerConfig) -> list[GPTModel]:
    """This rank's model: one chunk, or one per virtual stage for interleaved pipelining."""
    stages = cfg.parallel.virtual_pipeline
    if stages is None:
        return [build_gpt(cfg, tconfig)]
    return [build_gpt(cfg, tconfig, vp_stage=i) for i in range(stages)]


def build_model(cfg: Config, device_type: str, *, initialize: bool = True,
                tconfig: TransformerConfig | None = None) -> list[GPTModel]:
    """This rank's model chunks on its device: the one recipe of training, loading and the
    tools. initialize=False leaves the weights for a checkpoint to fill (no init cost); the
    initialization draws from megatron-core's model-parallel RNG, seeded by the caller."""
    tconfig = tconfig or transformer_config(cfg, device_type)
    tconfig.perform_initialization = initialize
    chunks = build_model_chunks(cfg, tconfig)
    return [chunk.cuda() for chunk in chunks] if device_type == "cuda" else chunks


def count_parameters(chunks: list[torch.nn.Module]) -> int:
    """Distinct parameters of these chunks (a tied embedding counts once)."""
    seen = {id(p): p.numel() for chunk in chunks for p in chunk.parameters()}
    return sum(seen.values())


def count_expert_parameters(chunks: list[torch.nn.Module]) -> int:
    """Parameters of one projected expert: the shared ones plus one dense matrix per bank."""
    from megatron_pn.pn.layers import ProjectedLinear

    total = count_parameters(chunks)
    for chunk in chunks:
        total -= chunk.expert_codes.numel()
        for module in chunk.modules():
            if isinstance(module, ProjectedLinear):
                total += math.prod(module.full_shape) - module.bank.numel()
                total -= module.code_projection.numel()
    return total


FLOPS_FORMULA = (
    "training FLOPs per token = 6 x (L x (2 d d_q + 2 d d_kv + c d f) + d V) + 6 x L x s x d_q, "
    "Megatron-LM's count: 2 FLOPs per multiply-add, 3 passes (forward, data and weight "
    "gradients); L layers, d model width, d_q = heads x head_dim, d_kv = query groups x "
    "head_dim, f MLP width, c = 3 for SwiGLU (2 for GELU), V padded vocabulary, s sequence "
    "length; the last term is causal attention (QK^T and AV over half the s x s scores)")


def flops_per_token(cfg: Config) -> float:
    """Model FLOPs of training one token (FLOPS_FORMULA): the numerator of MFU. A PN model
    counts as its expert shape (the projection is overhead, not model FLOPs)."""
    m = cfg.model
    d, s, layers = m.hidden_size, m.seq_length, m.num_layers
    head_dim = d // m.num_attention_heads
    d_q = head_dim * m.num_attention_heads
    d_kv = head_dim * (m.num_query_groups or m.num_attention_heads)
    c = 3 if ACTIVATIONS[m.activation][1] else 2
    matmul_weights = layers * (2 * d * d_q + 2 * d * d_kv + c * d * m.ffn_hidden_size)
    matmul_weights += d * padded_vocab_size(m)
    return 6 * matmul_weights + 6 * layers * s * d_q


def parameter_counts(cfg) -> dict:
    """{total, embedding, expert (PN: one projected expert, else None)}: the whole model built
    unsharded on the meta device (no memory, no initialization) in a world of one. The caller
    checks cfg first (checks.check_model)."""
    import dataclasses

    from megatron_pn.distributed import init_distributed, shutdown

    whole = dataclasses.replace(
        cfg, parallel=dataclasses.replace(cfg.parallel, tensor=1, pipeline=1, virtual_pipeline=None)
    )
    compat.activate()
    init_distributed("cpu")
    try:
        ps.initialize_model_parallel(1, 1)
        with torch.device("meta"):
            chunks = build_model(whole, "cpu", initialize=False)
        return {"total": count_parameters(chunks),
                "embedding": chunks[0].embedding.word_embeddings.weight.numel(),
                "expert": count_expert_parameters(chunks) if cfg.model.type == "pn" else None}
    finally:
        shutdown()
