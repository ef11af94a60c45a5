"""The model: megatron-core `GPTModel` built from a layer spec.

The model's family (`megatron_pn.families`, by model.type) supplies its decoder spec and model
class: the dense SLM/LLM use megatron-core's local layer spec (pure-torch modules, so CPU and GPU
share one code path); projected networks replace the MLP's linears in the same spec.
`build_model_chunks` returns one module per virtual pipeline stage of this rank.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import TransformerConfig

from megatron_pn import compat
from megatron_pn.config import LORA_TARGETS, Config, ModelConfig
from megatron_pn.families import family_of

ACTIVATIONS = {"swiglu": (F.silu, True), "gelu": (F.gelu, False)}  # (function, gated)


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


def build_gpt(cfg: Config, tconfig: TransformerConfig, vp_stage: int | None = None) -> GPTModel:
    pre = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    post = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    family = family_of(cfg)
    model_class, extra = family.model_class(cfg)
    return model_class(
        config=tconfig,
        transformer_layer_spec=family.decoder_spec(cfg, tconfig, vp_stage),
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


FLOPS_FORMULA = (
    "training FLOPs per token = 6 x (L x (2 d d_q + 2 d d_kv + c d f) + d V) + 6 x L x s x d_q, "
    "Megatron-LM's count: 2 FLOPs per multiply-add, 3 passes (forward, data and weight "
    "gradients); L layers, d model width, d_q = heads x head_dim, d_kv = query groups x "
    "head_dim, f MLP width, c = 3 for SwiGLU (2 for GELU), V padded vocabulary, s sequence "
    "length; the last term is causal attention (QK^T and AV over half the s x s scores). "
    "With LoRA adapters (finetune.lora) the frozen weights count 4 x (no weight gradient) and "
    "the adapters 6 x r (in + out) per adapted linear")


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
    attention = 6 * layers * s * d_q
    lora = cfg.finetune.lora
    if lora.rank is None:
        return 6 * matmul_weights + attention
    # LoRA: megatron-core's frozen-weight linear computes the forward and the input gradient
    # only (what the adapters below need), so a frozen weight costs 2 passes, not 3; each adapter
    # (A [r, in], B [out, r]) is trained: 3 passes over its r (in + out) multiply-adds.
    shapes = {"linear_qkv": (d, d_q + 2 * d_kv), "linear_proj": (d_q, d),
              "linear_fc1": (d, (c - 1) * m.ffn_hidden_size), "linear_fc2": (m.ffn_hidden_size, d)}
    adapters = layers * sum(lora.rank * sum(shapes[name]) for name in LORA_TARGETS[lora.targets])
    return 4 * matmul_weights + 6 * adapters + attention


def parameter_counts(cfg) -> dict:
    """{total, embedding, expert (PN: one projected expert, else None), trainable (LoRA: the
    adapters)}: the whole model built
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
        total = count_parameters(chunks)
        trainable = {id(p): p.numel() for c in chunks for p in c.parameters() if p.requires_grad}
        return {"total": total,
                "embedding": chunks[0].embedding.word_embeddings.weight.numel(),
                "expert": family_of(cfg).expert_parameters(chunks, total),
                "trainable": sum(trainable.values())}
    finally:
        shutdown()
