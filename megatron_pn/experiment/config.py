"""An experiment config (configs/experiments/*.yaml): the corpus, the methods and their
pretraining budgets, the specialization grid. Loaded from YAML with dotted overrides, checked
before any work starts."""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from megatron_pn.config import split_override
from pn_base.errors import ConfigError

METHODS = ("slm", "llm", "pn", "pnmix", "cond", "mix", "is", "distill")
LABELS = {"slm": "SLM", "llm": "LLM", "pn": "SLM-pn", "pnmix": "SLM-pn-mixture",
          "cond": "SLM-cond", "mix": "SLM-mix", "is": "SLM-is", "distill": "SLM-d"}
LORA = "+lora"  # a method's LoRA row: its specialized models fine-tuned with adapters instead
LABELS.update({method + LORA: LABELS[method] + " + LoRA" for method in METHODS
               if method != "distill"})


@dataclass
class Method:
    config: str = ""  # pn-train model config (distill: the student's; its teacher is the llm)
    budgets: list = field(default_factory=list)  # pretraining steps, one run each (mix: per expert)
    procs: int = 1  # processes per pretraining run (torchrun locally, tasks under SLURM)
    overrides: list = field(default_factory=list)  # pn-train overrides of its pretraining runs


@dataclass
class Curves:
    """Learning curves: pretraining runs evaluated on one shared schedule (issue 12's study)."""

    steps: int = 3000  # pretraining steps of every run
    eval_interval: int = 150  # steps between evaluations (generic test + each domain's valid)
    eval_max_tokens: int = 8000  # tokens of each evaluated set
    seeds: list = field(default_factory=lambda: [1, 2])  # one run per variant and seed
    variants: dict = field(default_factory=dict)  # name -> {config, overrides: [...]}


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    corpus: str = "data/corpus"  # DIR/<domain>/{train,valid,test}.jsonl.gz and DIR/generic/...
    domains: list = field(default_factory=list)
    generic_chars: int | None = 4_000_000  # generic train text used: its first documents up to
    #                                        this many characters (None: all of it)
    data_workers: int = 1  # pn-data preprocess --workers
    vocab_size: int = 4096  # SentencePiece vocabulary trained on that text
    spec_sizes: dict = field(default_factory=dict)  # name -> characters of a domain's train split
    test_max_tokens: int | None = None  # evaluate at most this many tokens of each test set
    clusters: dict = field(default_factory=lambda: {"pn": 4, "is": 16})  # k for PN/mix, SLM-is
    methods: dict = field(default_factory=dict)  # method -> Method
    finetune_config: str = "configs/finetune/tiny.yaml"
    lora_methods: list = field(default_factory=list)  # methods whose specialized models are
    #          also fine-tuned with LoRA adapters (rows METHOD+lora, e.g. SLM + LoRA)
    lora_config: str = "configs/finetune/lora.yaml"  # layered on finetune_config for those
    finetune_steps: dict = field(default_factory=dict)  # spec size name -> step cap
    distill: dict = field(default_factory=dict)  # pn-train distill.* settings (else its own)
    strategies: bool = True  # Table 5: every selection strategy, largest PN budget, first size
    pretrain_overrides: list = field(default_factory=list)  # pn-train overrides, every pretraining
    finetune_overrides: list = field(default_factory=list)  # ... every fine-tuning run
    slurm: dict = field(default_factory=dict)  # kind -> sbatch options (--executor slurm)
    curves: Curves | None = None  # learning curves of pretraining variants (see Curves)
    export_hf: dict = field(default_factory=dict)  # method -> domains whose fine-tuned model
    #          (largest budget, smallest spec size) is exported to Hugging Face: OUT/hf/METHOD/D

    @property
    def lora_rows(self) -> list[str]:
        """The methods of the experiment that get a LoRA row (lora_methods)."""
        return [m for m in self.lora_methods if m in self.methods]

    @property
    def smallest_size(self) -> str:
        return min(self.spec_sizes, key=self.spec_sizes.get)


def _set(raw: dict, text: str) -> None:
    """Apply 'a.b.c=value': the value (YAML) replaces what a.b.c held, whatever its type."""
    (*parents, leaf), value = split_override(text)
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{text}': {part} is not a section")
    node[leaf] = value


def load_experiment(path: str | Path, overrides: list[str] = ()) -> ExperimentConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"experiment config {path} not found (see configs/experiments/)")
    raw = yaml.safe_load(path.read_text()) or {}
    for text in overrides:
        _set(raw, text)
    known = {f.name for f in dataclasses.fields(ExperimentConfig)}
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)}; valid: {sorted(known)}")
    methods = raw.pop("methods", {}) or {}
    curves = raw.pop("curves", None)
    cfg = ExperimentConfig(**raw)
    if curves is not None:
        fields = {f.name for f in dataclasses.fields(Curves)}
        if not isinstance(curves, dict) or set(curves) - fields:
            raise ConfigError(f"{path}: curves: unknown keys {sorted(set(curves or {}) - fields)}"
                              f"; valid: {sorted(fields)}")
        cfg.curves = Curves(**curves)
    for name, spec in methods.items():
        if name not in METHODS:
            raise ConfigError(f"{path}: methods.{name}: unknown method; valid: {', '.join(METHODS)}")
        fields = {f.name for f in dataclasses.fields(Method)}
        if set(spec or {}) - fields:
            raise ConfigError(f"{path}: methods.{name}: unknown keys "
                              f"{sorted(set(spec) - fields)}; valid: {sorted(fields)}")
        cfg.methods[name] = Method(**(spec or {}))
    check(cfg, path)
    return cfg


def check(cfg: ExperimentConfig, path: Path) -> None:
    def fail(what: str):
        raise ConfigError(f"{path}: {what}")

    if not cfg.domains:
        fail("domains: list at least one domain (a directory of the corpus)")
    for domain in ["generic", *cfg.domains]:
        for split in ("train", "valid", "test"):
            if not (Path(cfg.corpus) / domain / f"{split}.jsonl.gz").is_file():
                fail(f"{cfg.corpus}/{domain}/{split}.jsonl.gz not found (corpus: {cfg.corpus})")
    if not cfg.spec_sizes or any(int(v) <= 0 for v in cfg.spec_sizes.values()):
        fail("spec_sizes: give name: characters (> 0) for each specialization set size")
    if set(cfg.finetune_steps) != set(cfg.spec_sizes):
        fail(f"finetune_steps: give a step cap for each spec size {sorted(cfg.spec_sizes)}")
    if not cfg.methods and not cfg.curves:
        fail(f"methods: list at least one of {', '.join(METHODS)} (or give curves)")
    if cfg.curves:
        check_curves(cfg.curves, cfg.clusters.get("pn", 1), fail)
    for name, method in cfg.methods.items():
        if name != "distill" and (not method.budgets or min(method.budgets) <= 0):
            fail(f"methods.{name}.budgets: give pretraining steps (> 0), one run each")
        if not Path(method.config).is_file():
            fail(f"methods.{name}.config: {method.config} not found")
    if set(cfg.methods) - {"llm"} and "slm" not in cfg.methods:
        fail("methods.slm is needed: its config is the dense shape every small model (a "
             "projected or SLM-mix expert, SLM-is, SLM-d) is fine-tuned in")
    if "distill" in cfg.methods and not {"slm", "llm"} <= set(cfg.methods):
        fail("methods.distill needs methods slm (the student) and llm (the teacher)")
    if "distill" in cfg.methods and (len(cfg.methods["slm"].budgets)
                                     != len(cfg.methods["llm"].budgets)):
        fail("methods.distill pairs the i-th slm budget (student) with the i-th llm budget "
             "(teacher): give slm and llm as many budgets")
    bad = [m for m in cfg.lora_methods if m not in METHODS or m == "distill"]
    if bad:
        fail(f"lora_methods: {bad} — give methods (not distill) whose specialized models are "
             f"also fine-tuned with LoRA, of {', '.join(METHODS[:-1])}")
    if cfg.lora_rows and not Path(cfg.lora_config).is_file():
        fail(f"lora_config: {cfg.lora_config} not found")
    for name, domains in cfg.export_hf.items():
        if name not in cfg.methods or name == "distill" or not set(domains) <= set(cfg.domains):
            fail(f"export_hf.{name}: give a method of the experiment (not distill) and a list "
                 f"of its domains")
    if set(cfg.clusters) != {"pn", "is"}:
        fail("clusters: give k for 'pn' (PN and SLM-mix) and 'is' (SLM-is)")


def check_curves(curves: Curves, k: int, fail) -> None:
    if curves.steps <= 0 or not 0 < curves.eval_interval <= curves.steps:
        fail("curves: steps > 0 and 0 < eval_interval <= steps")
    if not curves.seeds or not curves.variants:
        fail("curves: give seeds and at least one variant {name: {config, overrides}}")
    for name, variant in curves.variants.items():
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", str(name)):
            fail(f"curves.variants.{name}: a name of letters, digits, '_', '.', '-' (a directory)")
        if not isinstance(variant, dict) or set(variant) - {"config", "overrides"}:
            fail(f"curves.variants.{name}: give {{config: FILE, overrides: [key=value, ...]}}")
        if not Path(variant.get("config", "")).is_file():
            fail(f"curves.variants.{name}.config: {variant.get('config')} not found")
        if config_family(variant["config"]).per_cluster_jobs and (curves.steps % k or
                                                                 curves.eval_interval % k):
            fail(f"curves.variants.{name}: SLM-mix trains {k} experts for steps / {k} each: "
                 f"give curves.steps and eval_interval divisible by clusters.pn = {k}")


def method_config(method: Method, *overrides):
    """The pn-train config of a method's pretraining runs."""
    from megatron_pn.config import load_config

    return load_config([method.config], [*method.overrides, *overrides])


@functools.lru_cache(maxsize=None)
def config_family(config: str):
    """The model family of a pn-train config file (megatron_pn.families)."""
    from megatron_pn.config import load_config
    from megatron_pn.families import family_of

    return family_of(load_config([config]))
