"""Checks that run before any work: a bad config or layout fails with one clear line."""

from __future__ import annotations

import os

from megatron_pn.compat import GROUPED_GEMM, transformer_engine_available
from megatron_pn.config import LORA_TARGETS, Config, check_ranges
from megatron_pn.data import (check_long_enough, check_token_ids, resolve_blend, token_ids,
                              used_split)
from megatron_pn.families import FAMILIES, family_of
from megatron_pn.families.dense import ATTENTION_BACKENDS
from megatron_pn.model import ACTIVATIONS, padded_vocab_size
from megatron_pn.training.selection import selection_margin, selection_settings
from pn_base.errors import require as _require

CHOICES = {
    "engine": ("megatron", "deepspeed"),
    "model.type": tuple(FAMILIES),
    "model.activation": tuple(ACTIVATIONS),
    "model.normalization": ("RMSNorm", "LayerNorm"),
    "model.position_embedding_type": ("rope", "learned_absolute"),
    "model.attention_backend": ATTENTION_BACKENDS,
    "model.transformer_impl": ("auto", "local", "transformer_engine"),
    "data.mixture": ("none", "step", "micro_batch"),
    "train.decay_style": ("cosine", "linear", "constant"),
    "train.precision": ("auto", "bf16", "fp32"),
    "train.pn_grouped_gemm": GROUPED_GEMM,
    "checkpoint.optimizer_format": ("fully_reshardable", "dp_reshardable"),
    "checkpoint.on_damaged": ("fallback", "stop"),
    "finetune.lora.targets": tuple(LORA_TARGETS),
    "logging.wandb_mode": ("offline", "online", "disabled"),
}


def _get(cfg: Config, dotted: str):
    value = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def check_model(cfg: Config) -> None:
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        _require(value in allowed, f"{key}: '{value}' is not one of {', '.join(allowed)}")
    check_ranges(cfg)  # every numeric key against its declared range (config.py)
    selection_margin(cfg.train.selection_margin)
    m, t = cfg.model, cfg.train
    _require(t.decay_steps is None or t.warmup_steps < t.decay_steps,
             f"train.warmup_steps {t.warmup_steps} must be below train.decay_steps {t.decay_steps}")
    _require(t.min_lr <= t.lr, f"train.min_lr: must be <= train.lr {t.lr:g}, got {t.min_lr:g}")
    _require(m.hidden_size % m.num_attention_heads == 0,
             f"model.hidden_size {m.hidden_size} is not divisible by "
             f"model.num_attention_heads {m.num_attention_heads}")
    family_of(cfg).check_config(cfg)  # what this model.type cannot run
    check_lora(cfg)


def check_parallel(cfg: Config, world_size: int, device_type: str) -> None:
    m, p, t = cfg.model, cfg.parallel, cfg.train
    tp, pp, vp = p.tensor, p.pipeline, p.virtual_pipeline or 1
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


def check_transformer_engine(cfg: Config, device_type: str) -> None:
    m = cfg.model
    if m.transformer_impl != "transformer_engine":
        return
    _require(device_type == "cuda" and transformer_engine_available(),
             "model.transformer_impl transformer_engine needs a GPU with Transformer Engine "
             "installed; use local (or auto)")


def check_distill(cfg: Config) -> None:
    d = cfg.distill
    if d.teacher is None:
        return
    _require(cfg.parallel.pipeline == 1, "distill.teacher: distillation needs parallel.pipeline=1")


def check_lora(cfg: Config) -> None:
    """LoRA adapts the linears of a trained dense model under megatron-core."""
    if cfg.finetune.lora.rank is None:
        return
    family = family_of(cfg)
    _require(family.takes_lora,
             f"finetune.lora: adapters go on a dense model's linears, and model.type "
             f"{family.name} is not one — make its dense model first (pn-project) and fine-tune "
             "that checkpoint with model.type dense")
    _require(cfg.checkpoint.load is not None,
             "finetune.lora: adapters fine-tune a trained model; set checkpoint.load to its "
             "checkpoint")
    _require(cfg.engine == "megatron",
             "finetune.lora: the adapter checkpoint is a megatron-core one; set engine=megatron")
    _require(cfg.model.transformer_impl != "transformer_engine",
             "finetune.lora: adapters extend megatron-core's local linears; set "
             "model.transformer_impl=local (or auto)")


def check_deepspeed(cfg: Config, device_type: str) -> None:
    if cfg.engine != "deepspeed":
        return
    d, p = cfg.deepspeed, cfg.parallel
    _require(p.pipeline == 1 and p.virtual_pipeline is None,
             f"engine deepspeed: parallel.pipeline must be 1 (got {p.pipeline}); pipeline "
             "parallelism needs engine megatron")
    _require(d.zero_stage in (1, 2, 3), f"deepspeed.zero_stage: {d.zero_stage} is not one of 1, 2, 3")
    _require(not p.distributed_optimizer, "engine deepspeed: ZeRO shards the optimizer; set "
                                          "parallel.distributed_optimizer=false")
    _require(not d.offload_params or d.zero_stage == 3,
             "deepspeed.offload_params needs deepspeed.zero_stage=3")
    _require(not (d.offload_params or d.offload_optimizer) or device_type == "cuda",
             "deepspeed offload moves GPU memory to the CPU: on a CPU-only machine there is "
             "nothing to offload; set deepspeed.offload_optimizer/offload_params=false")


def check_config(cfg: Config, world_size: int, device_type: str) -> list[str]:
    """Every check that needs no process group; returns warnings (what the run will do that a
    user may not mean) for the caller to print."""
    check_model(cfg)
    check_deepspeed(cfg, device_type)
    check_distill(cfg)
    check_transformer_engine(cfg, device_type)
    check_parallel(cfg, world_size, device_type)
    check_memory(cfg, device_type)
    blend = resolve_blend(cfg.data)
    family_of(cfg).check_data(cfg, blend)
    if cfg.data.valid_blend:
        resolve_blend(cfg.data, cfg.data.valid_blend)
    check_eval_sets(cfg)
    check_validation_data(cfg)
    split = None if cfg.data.valid_blend else used_split(cfg.data, bool(cfg.train.eval_interval))
    token_ids(cfg.data, cfg.model.vocab_size)  # a missing, damaged or too large tokenizer
    for prefix in blend.prefixes:
        check_long_enough(prefix, cfg.model.seq_length, split)
        check_token_ids(prefix, cfg.model.vocab_size)
    return family_of(cfg).data_warnings(cfg, blend)


def check_validation_data(cfg: Config) -> None:
    """Early stopping and checkpoint.keep_best compare validation losses: they need evaluations
    and validation data; train.eval_interval needs validation data or train.eval_sets."""
    t = cfg.train
    compare = selection_settings(cfg)
    _require(not compare or t.eval_interval > 0,
             f"{' and '.join(compare)} compare validation losses, but train.eval_interval is 0 "
             "(train.eval_interval) — set train.eval_interval to the steps between evaluations")
    wanted = compare + (["train.eval_interval"] if t.eval_interval > 0 and not t.eval_sets else [])
    if not wanted or cfg.data.valid_blend:
        return
    valid_share = float(used_split(cfg.data, True).split(",")[1])
    _require(valid_share > 0,
             f"{' and '.join(wanted)} need validation data, but data.split {cfg.data.split} "
             "leaves none and data.valid_blend is empty (data.split) — give the split a "
             "validation share (e.g. 969,30,1) or set data.valid_blend")


def activation_bytes(cfg: Config) -> int:
    """A lower bound of one micro-batch's memory on one device: its fp32 logits, one hidden
    state per layer, and the [s, s] attention scores of the local backend."""
    m, p = cfg.model, cfg.parallel
    tokens = cfg.train.micro_batch_size * m.seq_length
    logits = tokens * padded_vocab_size(m) // p.tensor * 4
    hidden = tokens * m.hidden_size * max(m.num_layers // p.pipeline, 1) * 2
    scores = 0
    if m.attention_backend == "local":
        heads = max(m.num_attention_heads // p.tensor, 1)
        scores = cfg.train.micro_batch_size * heads * m.seq_length ** 2 * 4
    return logits + hidden + scores


def device_memory(device_type: str) -> int | None:
    """Bytes of this device's memory (None: not known here, e.g. a GPU job checked on a login
    node without one)."""
    if device_type == "cuda":
        import torch

        if not torch.cuda.is_available():
            return None
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_memory(cfg: Config, device_type: str) -> None:
    need, have = activation_bytes(cfg), device_memory(device_type)
    if have is None:
        return
    gib = 2 ** 30
    _require(need <= have,
             f"model.seq_length {cfg.model.seq_length} x train.micro_batch_size "
             f"{cfg.train.micro_batch_size} needs at least {need / gib:,.0f} GiB for one "
             f"micro-batch (logits and activations), more than the {have / gib:,.0f} GiB of this "
             f"{device_type} device (model.seq_length) — lower model.seq_length or "
             "train.micro_batch_size, or split the model with parallel.tensor/pipeline")


def check_eval_sets(cfg: Config) -> None:
    sets = cfg.train.eval_sets
    if not sets:
        return
    for entry in sets:
        family_of(cfg).check_eval_set(cfg, entry)
    names = [entry[0] for entry in sets]
    _require(len(set(names)) == len(names), f"train.eval_sets: names must be distinct: {names}")
