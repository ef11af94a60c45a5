"""Checks that run before any work: a bad config or layout fails with one clear line."""

from __future__ import annotations

from megatron_pn.config import Config, ConfigError
from megatron_pn.data import resolve_blend
from megatron_pn.model import ACTIVATIONS, padded_vocab_size

CHOICES = {
    "model.type": ("dense",),
    "model.activation": tuple(ACTIVATIONS),
    "model.normalization": ("RMSNorm", "LayerNorm"),
    "model.position_embedding_type": ("rope", "learned_absolute"),
    "train.decay_style": ("cosine", "linear", "constant"),
    "train.precision": ("auto", "bf16", "fp32"),
    "checkpoint.optimizer_format": ("fully_reshardable", "dp_reshardable"),
    "logging.wandb_mode": ("offline", "online", "disabled"),
}


def _get(cfg: Config, dotted: str):
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate_model(cfg: Config) -> None:
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        _require(value in allowed, f"{key}: '{value}' is not one of {', '.join(allowed)}")
    m = cfg.model
    for key in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size",
                "vocab_size", "seq_length"):
        _require(getattr(m, key) > 0, f"model.{key} must be positive, got {getattr(m, key)}")
    t = cfg.train
    _require(t.steps >= 0 and t.warmup_steps >= 0, "train.steps and train.warmup_steps must be >= 0")
    _require(t.decay_steps is None or t.warmup_steps < t.decay_steps,
             f"train.warmup_steps {t.warmup_steps} must be below train.decay_steps {t.decay_steps}")
    _require(m.hidden_size % m.num_attention_heads == 0,
             f"model.hidden_size {m.hidden_size} is not divisible by "
             f"model.num_attention_heads {m.num_attention_heads}")


def validate_parallel(cfg: Config, world_size: int, device_type: str) -> None:
    m, p, t = cfg.model, cfg.parallel, cfg.train
    tp, pp, vp = p.tensor, p.pipeline, p.virtual_pipeline or 1
    _require(tp >= 1 and pp >= 1 and vp >= 1, "parallel sizes must be >= 1")
    for name, value in (("model.hidden_size", m.hidden_size),
                        ("model.num_attention_heads", m.num_attention_heads),
                        ("model.num_query_groups", m.num_query_groups or m.num_attention_heads),
                        ("model.ffn_hidden_size", m.ffn_hidden_size),
                        ("padded vocabulary", padded_vocab_size(m))):
        _require(value % tp == 0, f"{name} {value} is not divisible by parallel.tensor {tp}")
    _require(m.num_layers % (pp * vp) == 0,
             f"model.num_layers {m.num_layers} is not divisible by parallel.pipeline {pp} x "
             f"parallel.virtual_pipeline {vp}")
    _require(p.virtual_pipeline is None or pp > 1,
             "parallel.virtual_pipeline needs parallel.pipeline > 1")
    _require(not p.sequence_parallel or tp > 1, "parallel.sequence_parallel needs parallel.tensor > 1")
    _require(world_size % (tp * pp) == 0,
             f"world size {world_size} is not divisible by parallel.tensor {tp} x "
             f"parallel.pipeline {pp}; launch a multiple of {tp * pp} processes")
    dp = world_size // (tp * pp)
    _require(t.global_batch_size % (t.micro_batch_size * dp) == 0,
             f"train.global_batch_size {t.global_batch_size} is not divisible by "
             f"train.micro_batch_size {t.micro_batch_size} x data-parallel size {dp}")
    _require(t.precision != "bf16" or device_type == "cuda",
             "train.precision bf16 needs a GPU; use fp32 (or auto) on CPU")


def validate_config(cfg: Config, world_size: int, device_type: str) -> None:
    validate_model(cfg)
    validate_parallel(cfg, world_size, device_type)
    resolve_blend(cfg.data)
