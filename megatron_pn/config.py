"""Run configuration: typed dataclasses filled from YAML files and `dotted.key=value` overrides.

    cfg = load_config(["configs/tiny/slm.yaml"], ["train.lr=3e-4", "parallel.tensor=2"])

Later files and overrides win. Unknown keys are errors that name the file and suggest the
closest valid keys; values are converted to the field's type. `describe()` prints every key with
its default and help — the reference for what a config may contain.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pn_base.errors import ConfigError, one_line


@dataclass(frozen=True)
class Range:
    """The valid values of a numeric key (None: unbounded on that side)."""
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself excluded
    high_open: bool = False

    def __contains__(self, value) -> bool:
        low_ok = self.low is None or (value > self.low if self.low_open else value >= self.low)
        high_ok = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return low_ok and high_ok

    def __str__(self) -> str:
        if self.high is None:
            return f"must be {'>' if self.low_open else '>='} {_number(self.low)}"
        return (f"must be in {'(' if self.low_open else '['}{_number(self.low)}, "
                f"{_number(self.high)}{')' if self.high_open else ']'}")


def _number(value) -> str:
    """-1.0 as -1, 1048576 in full, 3e-4 as 0.0003."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


AT_LEAST_0, AT_LEAST_1, ABOVE_0 = Range(0), Range(1), Range(0, low_open=True)
FRACTION = Range(0, 1, high_open=True)  # dropout, Adam betas
MAX_SEQ_LENGTH = 1_048_576
VALID_TOKENS = 32768  # train.valid_tokens, and what pn-project's best-loss scores each expert on


def _help(text: str, default=dataclasses.MISSING, factory=dataclasses.MISSING,
          valid: Range | None = None):
    kwargs = {"metadata": {"help": text, "valid": valid}}
    if factory is not dataclasses.MISSING:
        kwargs["default_factory"] = factory
    else:
        kwargs["default"] = default
    return field(**kwargs)


@dataclass
class ModelConfig:
    type: str = _help(
        "dense (a GPT SLM/LLM), pn (projected network, one expert per cluster), mix "
        "(SLM-mix: a dense SLM trained on one cluster, data.expert) or cond (SLM-cond: the "
        "dense SLM with a learned input vector per cluster, a control for pn)", "dense")
    num_layers: int = _help("transformer layers", 2, valid=AT_LEAST_1)
    hidden_size: int = _help("model width d_model", 64, valid=AT_LEAST_1)
    num_attention_heads: int = _help("attention heads", 4, valid=AT_LEAST_1)
    num_query_groups: int | None = _help("grouped-query attention groups (None: = heads)", None,
                                         valid=AT_LEAST_1)
    ffn_hidden_size: int = _help("MLP width (for swiglu, ~2/3 of a GELU MLP's width)", 176,
                                 valid=AT_LEAST_1)
    activation: str = _help("swiglu (Llama-style, gated) or gelu (GPT-2-style)", "swiglu")
    normalization: str = _help("RMSNorm or LayerNorm", "RMSNorm")
    norm_epsilon: float = _help("normalization epsilon", 1e-5, valid=ABOVE_0)
    add_bias_linear: bool = _help("biases in linear layers", False)
    position_embedding_type: str = _help("rope or learned_absolute", "rope")
    rotary_base: int = _help("RoPE base", 10000, valid=ABOVE_0)
    tie_embeddings: bool = _help("share input embedding and output layer weights", True)
    vocab_size: int = _help("tokenizer vocabulary size (padded up for TP)", 32000, valid=AT_LEAST_1)
    make_vocab_size_divisible_by: int = _help("pad the vocabulary to a multiple of this", 128,
                                              valid=AT_LEAST_1)
    seq_length: int = _help("training context length in tokens", 1024,
                            valid=Range(1, MAX_SEQ_LENGTH))
    init_method_std: float = _help("std of the normal weight initialization", 0.02,
                                   valid=AT_LEAST_0)
    num_experts: int = _help("pn, mix, cond: k, experts = clusters of the training data", 0,
                             valid=AT_LEAST_0)
    bank_size: int = _help("pn: h, matrices in each MLP weight bank", 0, valid=AT_LEAST_0)
    code_size: int = _help("pn: m, length of each expert's code (1 <= m <= h)", 0, valid=AT_LEAST_0)
    code_init: str = _help(
        "pn: initial expert codes E: random (independent unit codes: experts start unrelated) "
        "or shared (one unit code plus a per-expert deviation of norm code_init_spread: the "
        "experts start as one network and branch out: better per step, docs/RESULTS.md)",
        "shared")
    code_init_spread: float = _help("pn, code_init shared: size of each expert's deviation "
                                    "from the shared code (0: identical experts)", 0.1,
                                    valid=AT_LEAST_0)
    project_attention: bool = _help("pn: project the attention matrices too (paper: MLP only)",
                                    False)
    code_map: str = _help(
        "pn: the code of a cluster mixture w (data.mixture training, pn-project --strategy "
        "histogram): linear (w @ E) or learned (w @ E + a small MLP of w, zero at init, as in "
        "Soup-of-Experts; cluster i then has the code of its one-hot mixture)", "linear")
    code_map_hidden: int = _help("pn, code_map learned: width of the map's hidden layer", 64,
                                 valid=AT_LEAST_1)
    attention_backend: str = _help(
        "sdpa (torch scaled_dot_product_attention: flash/memory-efficient kernels on GPU, "
        "no [s, s] score matrix) or local (megatron-core's DotProductAttention)", "sdpa")
    transformer_impl: str = _help(
        "local (megatron-core's torch modules), transformer_engine (its TE layer spec; dense "
        "models on a GPU with Transformer Engine; other parameter names: checkpoints and "
        "pn-export-hf need local) or auto (TE where usable, for dense models)", "local")
    fusions: bool = _help("megatron-core's fused kernels where this device runs them exactly "
                          "enough (compat.fusion_settings; GPU only)", True)
    hidden_dropout: float = _help("dropout after attention/MLP", 0.0, valid=FRACTION)
    attention_dropout: float = _help("dropout on attention probabilities", 0.0, valid=FRACTION)


@dataclass
class ParallelConfig:
    tensor: int = _help("tensor-parallel size (TP)", 1, valid=AT_LEAST_1)
    pipeline: int = _help("pipeline-parallel size (PP)", 1, valid=AT_LEAST_1)
    virtual_pipeline: int | None = _help("model chunks per pipeline rank (interleaved 1F1B)", None,
                                         valid=AT_LEAST_1)
    sequence_parallel: bool = _help("sequence parallelism (needs TP > 1)", False)
    distributed_optimizer: bool = _help("shard optimizer state across data-parallel ranks", False)
    overlap_grad_reduce: bool = _help("overlap DP gradient reduce with backward (GPU)", False)


@dataclass
class DataConfig:
    blend: list = _help(
        "dataset prefixes (PREFIX for PREFIX.bin/.idx), or [weight, PREFIX] pairs", factory=list
    )
    blend_file: str | None = _help(
        "JSON file with {'blend': [[weight, prefix], ...], 'cluster_ids': [...]} "
        "(pn-data cluster/importance write these)", None)
    cluster_ids: list | None = _help(
        "pn/mix: the cluster id of each blend entry (default: from blend_file)", None)
    expert: int | None = _help(
        "mix: train on this cluster's data only (run dirs get /expert_NNNN appended)", None,
        valid=AT_LEAST_0)
    group_by_cluster: bool = _help(
        "pn: order each global batch by cluster so micro-batches hold one or two clusters "
        "(same samples per step, fewer expert projections; the model groups any order itself)",
        False)
    mixture: str = _help(
        "pn: mixture training. none (hard routing, the paper: each sequence its cluster's "
        "expert), step or micro_batch: each step (or micro-batch) draws cluster weights w, "
        "samples its sequences from the per-cluster datasets in proportion to w and computes "
        "them all with the code of w (model.code_map), so any cluster histogram makes a model "
        "(pn-project --strategy histogram)", "none")
    mixture_concentration: float = _help(
        "data.mixture: w ~ Dirichlet(concentration x k x p), p the blend's cluster shares (so "
        "the clusters are drawn as often as in hard routing, on average); small: w near one "
        "cluster, large: near p", 1.0, valid=ABOVE_0)
    mixture_one_hot: float = _help(
        "data.mixture: share of draws that are one cluster (cluster i with probability p_i), "
        "so single experts stay trained", 0.25, valid=Range(0, 1))
    split: str = _help("train,valid,test proportions of the documents", "969,30,1")
    valid_blend: list = _help(
        "separate validation datasets (prefixes or [weight, prefix]); then all of data.blend "
        "trains and data.split is not used (dense models)", factory=list)
    tokenizer_model: str | None = _help("SentencePiece model: EOD id and vocab checked", None)
    allow_tokenizer_mismatch: bool = _help(
        "train although the datasets, checkpoint.load, the checkpoint resumed or "
        "distill.teacher record different tokenizers (sha256 of the .model); refused otherwise",
        False)
    eod_id: int = _help("end-of-document token id (when no tokenizer_model is given)", 2,
                        valid=AT_LEAST_0)
    num_workers: int | None = _help(
        "data loader worker processes per rank, reading a step's micro-batches ahead while the "
        "model computes (0: read in the step); None: 2 on GPU, 0 on CPU (compat.data_workers)",
        None, valid=AT_LEAST_0)
    cache_dir: str | None = _help("where megatron-core caches sample indices (default: run dir)", None)


@dataclass
class TrainConfig:
    steps: int = _help("optimizer steps to train", 20, valid=AT_LEAST_0)
    micro_batch_size: int = _help("sequences per micro-batch per data-parallel rank", 4,
                                  valid=AT_LEAST_1)
    global_batch_size: int = _help("sequences per step = micro x accumulation x DP", 8,
                                   valid=AT_LEAST_1)
    lr: float = _help("peak learning rate", 1e-3, valid=AT_LEAST_0)
    min_lr: float = _help("final learning rate after decay", 1e-4, valid=AT_LEAST_0)
    warmup_steps: int = _help("linear warm-up steps", 2, valid=AT_LEAST_0)
    decay_style: str = _help("cosine, linear or constant", "cosine")
    decay_steps: int | None = _help("steps over which to decay (default: all steps)", None,
                                    valid=AT_LEAST_1)
    weight_decay: float = _help("AdamW weight decay", 0.0, valid=AT_LEAST_0)
    adam_beta1: float = _help("Adam beta1", 0.9, valid=FRACTION)
    adam_beta2: float = _help("Adam beta2", 0.95, valid=FRACTION)
    adam_eps: float = _help("Adam epsilon", 1e-8, valid=ABOVE_0)
    clip_grad: float = _help("gradient clipping norm (0: off)", 1.0, valid=AT_LEAST_0)
    precision: str = _help("auto (bf16 on GPU, fp32 on CPU), bf16 or fp32", "auto")
    seed: int = _help("seed for initialization and data order", 1234, valid=Range(0, 2**32 - 1))
    eval_interval: int = _help("steps between validation runs (0: off)", 0, valid=AT_LEAST_0)
    valid_tokens: int = _help(
        "tokens of the validation split each evaluation scores: the same fixed windows every "
        "time, as pn-eval reads a set (every token predicted once, windows of the model's "
        "context within documents), the first of each validation dataset's windows up to its "
        "share (by blend weight; unweighted: by its validation tokens); all of them when fewer. "
        "The loss early stopping, keep-best and the step-0 candidate compare",
        VALID_TOKENS, valid=AT_LEAST_1)
    selection_margin: str = _help(
        "how much a validation loss must beat the best so far to replace it (early stopping "
        "counts evaluations without such a gain): auto, the noise of the comparison (the "
        "standard error of the per-token difference on the same windows, from per-window "
        "sums), or a number of nats >= 0", "auto")
    pn_bank_lr_mult: float = _help(
        "pn: learning-rate multiplier of the weight banks T. Under Adam every bank entry moves "
        "about lr per step, so a projected weight W = sum_r alpha_r T_r moves about "
        "||alpha||_1 x lr (~0.8 sqrt(h) x): 1 / that restores a dense weight's rate", 1.0,
        valid=ABOVE_0)
    cond_vector_lr_mult: float = _help(
        "cond: learning-rate multiplier of the per-cluster input vectors. Under Adam each of "
        "their entries moves about lr per step, against token embeddings of entries ~0.02", 1.0,
        valid=ABOVE_0)
    pn_project_once_per_step: bool = _help(
        "pn: project each expert's weights once per optimizer step, reused by every micro-batch "
        "and backpropagated once (memory: W and dL/dW of each expert the step uses). false, and "
        "always under DeepSpeed ZeRO-3 or an offloaded optimizer (they add the previous step's "
        "to a gradient that first comes in a later micro-batch, engines.py): once per "
        "micro-batch", True)
    pn_grouped_gemm: str = _help(
        "pn: a micro-batch's per-expert GEMMs (rows sorted by expert): grouped (one "
        "torch._grouped_mm call), loop (one GEMM per expert) or auto (grouped on a GPU of "
        "compute capability >= 9.0 in bf16, else loop: compat.grouped_gemm)", "auto")
    eval_sets: list = _help(
        "more held-out sets evaluated at every eval_interval, as pn-eval does (every token "
        "predicted once): [[name, prefix], ...]; for pn, [[name, prefix, ROUTE], ...] where ROUTE "
        "is the expert that computes the whole set (e.g. its most frequent cluster's) or a "
        "`pn-data assign` directory of the set (each window by its cluster's expert); for mix, "
        "[name, prefix, ASSIGN_DIR] keeps the windows of the expert's cluster. Logged as "
        "eval/<name> (loss, ppl, stderr, tokens)", factory=list)
    eval_sets_max_tokens: int | None = _help("evaluate at most this many tokens of each of "
                                             "train.eval_sets (None: all)", 20000, valid=AT_LEAST_1)
    log_interval: int = _help("steps between log lines", 1, valid=AT_LEAST_1)
    early_stopping_patience: int | None = _help(
        "stop when the validation loss has not beaten the best by train.selection_margin for "
        "this many evaluations (from loaded weights, the model at step 0 is evaluated first "
        "and counts)", None, valid=AT_LEAST_1)
    lr_factor_of_loaded: float | None = _help(
        "fine-tuning: lr and min_lr = this factor x those of the checkpoint.load run "
        "(the paper: 1/3)", None, valid=ABOVE_0)
    exit_after_steps: int | None = _help("stop (with a checkpoint) after this many steps", None,
                                         valid=AT_LEAST_0)
    heartbeat_timeout: float = _help(
        "seconds a rank may go silent (killed, frozen, cut off) before the job stops, naming "
        "its node, instead of waiting in a collective (gloo: 30 minutes; a frozen peer: "
        "forever); 0: off (training/heartbeat.py)", 120.0, valid=AT_LEAST_0)
    exit_duration_minutes: float | None = _help(
        "stop (with a checkpoint) once this much wall time has passed, e.g. before a job's "
        "time limit", None, valid=AT_LEAST_0)


@dataclass
class CheckpointConfig:
    dir: str | None = _help("checkpoint directory (resumes automatically from its latest)", None)
    save_interval: int = _help("steps between checkpoints (0: only at the end/on signal)", 0,
                               valid=AT_LEAST_0)
    save_at_end: bool = _help("save when training finishes", True)
    load: str | None = _help("initialize the model from this checkpoint (no optimizer)", None)
    keep_last: int | None = _help("keep only the newest N checkpoints (None: keep all)", None,
                                  valid=AT_LEAST_1)
    on_damaged: str = _help(
        "a damaged latest iteration when resuming (a missing or truncated shard, missing "
        "metadata): fallback (say so and resume from the newest intact one) or stop (exit 2)",
        "fallback")
    keep_best: bool = _help(
        "save at each new best validation loss; best_checkpointed_iteration.txt names it and "
        "tools reading the directory (pn-eval, pn-export-hf, checkpoint.load) use it; from "
        "loaded weights (fine-tuning) step 0 is a candidate too", False)
    optimizer_format: str = _help(
        "distributed optimizer layout on disk: fully_reshardable (any TP/PP/DP) or "
        "dp_reshardable (faster, same TP/PP)",
        "fully_reshardable",
    )


@dataclass
class LoggingConfig:
    run_dir: str = _help("where logs, TensorBoard events and caches go", "runs/default")
    tensorboard: bool = _help("write TensorBoard events under run_dir/tensorboard", True)
    wandb_mode: str = _help("wandb: offline, online or disabled", "offline")
    wandb_project: str = _help("wandb project name", "megatron-pn")
    peak_tflops: float | None = _help("device peak TFLOP/s for MFU (default: known GPUs)", None,
                                      valid=ABOVE_0)
    progress_bar: bool = _help("show a tqdm progress bar over steps", False)
    phase: str = _help("cost-accounting label of this run (run_dir/cost.json), e.g. pretrain, "
                       "finetune", "train")


@dataclass
class DistillConfig:
    teacher: str | None = _help("SLM-d: checkpoint of the teacher (a fine-tuned LLM); "
                                "enables distillation", None)
    weight: float = _help("weight w of the KL to the teacher (1 - w on the data loss)", 0.5,
                          valid=Range(0, 1))
    temperature: float = _help("softmax temperature T of teacher and student", 1.0, valid=ABOVE_0)


@dataclass
class DeepSpeedConfig:
    zero_stage: int = _help("ZeRO stage: 1 (optimizer state), 2 (+ gradients), 3 (+ parameters)",
                            1)
    offload_optimizer: bool = _help("keep optimizer state in CPU memory (GPU runs)", False)
    offload_params: bool = _help("keep parameters in CPU memory (ZeRO-3, GPU runs)", False)
    config_file: str | None = _help("DeepSpeed JSON whose entries override the generated config",
                                    None)


LORA_TARGETS = {"attention": ("linear_qkv", "linear_proj"), "mlp": ("linear_fc1", "linear_fc2")}
LORA_TARGETS["both"] = LORA_TARGETS["attention"] + LORA_TARGETS["mlp"]  # finetune.lora.targets


@dataclass
class LoraConfig:
    rank: int | None = _help(
        "LoRA: rank r of the low-rank adapters W + (alpha / r) B A trained on the frozen dense "
        "model's linears (None: no adapters, full fine-tuning); the adapter checkpoint holds the "
        "adapters and where the base is, not the base weights (megatron_pn/lora.py)", None,
        valid=AT_LEAST_1)
    alpha: float = _help("LoRA: scale numerator, the adapters add (alpha / rank) B A", 16.0,
                         valid=ABOVE_0)
    dropout: float = _help("LoRA: dropout on the adapters' input", 0.0, valid=FRACTION)
    targets: str = _help("LoRA: which linears get adapters: attention (linear_qkv, linear_proj), "
                         "mlp (linear_fc1, linear_fc2) or both", "both")


@dataclass
class FinetuneConfig:
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class Config:
    engine: str = _help("megatron (megatron-core DDP, distributed optimizer, pipelines) or "
                        "deepspeed (ZeRO; PP = 1)", "megatron")
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# Loading


_EXPONENT_FLOAT = re.compile(r"[-+]?[0-9]+(\.[0-9]*)?[eE][-+]?[0-9]+")


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _convert(value, typ, where: str):
    """Convert a YAML value to the field type (ints accepted for floats, None for Optional)."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        options = [t for t in typing.get_args(typ) if t is not type(None)]
        if value is None:
            return None
        return _convert(value, options[0], where)
    if dataclasses.is_dataclass(typ):
        raise ConfigError(f"{where}: is a section; set its keys, e.g. {where}.<key>=...")
    if typ is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if typ is float and isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value):
        return float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
    if typ is list and isinstance(value, list):
        return value
    if typ in (int, str, bool) and type(value) is typ:
        return value
    if typ is str and isinstance(value, (int, float)):
        return str(value)
    raise ConfigError(f"{where}: expected {getattr(typ, '__name__', typ)}, got {value!r}")


def _unknown_key(where: str, key: str, valid: list[str]) -> ConfigError:
    near = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(near)}?" if near else ""
    return ConfigError(f"{where}: unknown key '{key}'.{hint} Valid keys: {', '.join(valid)}")


# Keys of earlier versions: the config a checkpoint saved may hold them (dropped when read); a
# config file or override naming one is told what replaced it.
RETIRED = {"train.eval_steps": "validation scores fixed windows of the validation split; "
                               "size them with train.valid_tokens"}


def _apply(obj, updates: dict, source: str, path: str = "", saved: bool = False) -> None:
    types_ = _field_types(type(obj))
    for key, value in updates.items():
        where = f"{source}: {path}{key}"
        if key not in types_:
            retired = RETIRED.get(path + key)
            if retired and saved:
                continue
            if retired:
                raise ConfigError(f"{where}: no longer a key: {retired}")
            raise _unknown_key(f"{source}: {path.rstrip('.') or 'top level'}", key, list(types_))
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: is a section; expected a mapping of its keys")
            _apply(current, value, source, f"{path}{key}.", saved)
        else:
            setattr(obj, key, _convert(value, types_[key], where))


def split_override(text: str) -> tuple[list[str], object]:
    """'train.lr=3e-4' -> (['train', 'lr'], 0.0003): the dotted key and the value (YAML)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected dotted.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        raise ConfigError(f"override '{text}': the value is not valid YAML") from None
    return key.strip().split("."), value


def parse_override(text: str) -> dict:
    """'train.lr=3e-4' -> {'train': {'lr': 0.0003}}."""
    keys, value = split_override(text)
    for part in reversed(keys):
        value = {part: value}
    return value


def split_args(args: list[str]) -> tuple[list[str], list[str]]:
    """A command line's `CONFIG.yaml ... key=value ...` as (config files, dotted overrides)."""
    return [a for a in args if "=" not in a], [a for a in args if "=" in a]


def load_config(files: list[str], overrides: list[str] = ()) -> Config:
    cfg = Config()
    for name in files:
        path = Path(name)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: invalid YAML: {one_line(err)}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
        _apply(cfg, data, str(path))
    for text in overrides:
        _apply(cfg, parse_override(text), f"override '{text}'")
    return cfg


def config_from_dict(data: dict, source: str = "checkpoint") -> Config:
    """A Config from `Config.to_dict()` output (e.g. the config saved in a checkpoint)."""
    cfg = Config()
    _apply(cfg, data, source, saved=True)
    return cfg


def check_ranges(section, prefix: str = "") -> None:
    """Every numeric key against the range its field declares (`valid=`), e.g.
    `train.lr: must be >= 0, got -1`."""
    for f in dataclasses.fields(section):
        value, valid = getattr(section, f.name), f.metadata.get("valid")
        if dataclasses.is_dataclass(value):
            check_ranges(value, f"{prefix}{f.name}.")
        elif valid is not None and value is not None and value not in valid:
            raise ConfigError(f"{prefix}{f.name}: {valid}, got {_number(value)}")


def describe(cls=Config, prefix: str = "") -> list[str]:
    """One line per key: 'section.key (default): help'."""
    lines = []
    for f in dataclasses.fields(cls):
        if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(
            typing.get_type_hints(cls)[f.name]
        ):
            lines += describe(typing.get_type_hints(cls)[f.name], f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        valid = f.metadata.get("valid")
        lines.append(f"  {prefix}{f.name} = {default!r}  # {f.metadata.get('help', '')}"
                     + (f" ({valid})" if valid else ""))
    return lines
