"""The experiment as a graph of steps, each one of the project's commands.

    data      tokenizer, indexed datasets, embeddings, k-means (k_pn, k_is), assignments,
              importance blends
    pretrain  one run per method and budget (SLM-mix: one per expert; SLM-is: one per domain,
              spec size and budget)
    project   SLM-pn: the expert of the spec set (pn-project), SLM-mix: link to the expert of
              the spec set's most frequent cluster
    finetune  every (method, budget, domain, spec size): lr / 3, early stopping, best kept;
              SLM-d distills the fine-tuned LLM of the same budget index into the SLM; the
              lora_methods' models also with LoRA adapters (method+lora, its own spec dir)
    eval      test perplexity before and after fine-tuning, generic perplexity (pn-eval --batch)

Layout under the output directory (what report.py reads):
    pretrain/<method>/b<B>/ckpt        (mix: .../ckpt/expert_NNNN; is: pretrain/is/<d>_<s>/b<B>)
    spec/<method>/b<B>/<d>_<s>/{source,ft,eval_before.json,eval_after.json}
    pretrain/<method>/b<B>/eval_generic*.json
    strategies/<d>_<s>/<strategy>/...  (Table 5)
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from megatron_pn.experiment.config import (LORA, ExperimentConfig, config_family,
                                           method_config)
from pn_base.outputs import FINISHED, HISTOGRAM, expert_dir

STRATEGIES = ("most-frequent", "best-loss", "histogram")


@dataclass
class Step:
    name: str
    kind: str  # data | pretrain | project | finetune | eval
    done: Path  # exists once the step finished (every tool writes its outputs atomically)
    cmd: list = field(default_factory=list)  # argv; empty for an eval (batched: eval_job)
    deps: list = field(default_factory=list)  # names of steps that must finish first
    procs: int = 1  # processes (torchrun --nproc-per-node locally; tasks under SLURM)
    eval_job: dict | None = None  # one entry of a `pn-eval --batch` file


def python(module: str, *args, procs: int = 1) -> list[str]:
    if procs == 1:
        return [sys.executable, "-m", module, *map(str, args)]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs),
            "-m", module, *map(str, args)]


def finished(run_dir: Path) -> Path:
    """The file pn-train writes when a run is over (train.steps reached or early stopping)."""
    return run_dir / FINISHED


class Grid:
    def __init__(self, cfg: ExperimentConfig, out: Path):
        self.cfg, self.out = cfg, out
        self.steps: dict[str, Step] = {}
        self.tokenizer = out / "tokenizer" / "spm"

    def add(self, step: Step) -> str:
        if step.name not in self.steps:
            self.steps[step.name] = step
        return step.name

    # -- data ----------------------------------------------------------------------------------

    def corpus_file(self, domain: str, split: str) -> Path:
        return Path(self.cfg.corpus) / domain / f"{split}.jsonl.gz"

    def subset_file(self, name: str) -> Path:
        """Inputs cut to a size (first documents): made by runner.prepare_subsets."""
        return self.out / "corpus" / f"{name}.jsonl.gz"

    def dataset(self, name: str, source: Path) -> tuple[str, Path]:
        prefix = self.out / "data" / name
        step = self.add(Step(f"data/preprocess/{name}", "data", Path(f"{prefix}.idx"), python(
            "data_tools", "preprocess", "--input", source, "--tokenizer-model",
            f"{self.tokenizer}.model", "--output-prefix", prefix, "--workers",
            self.cfg.data_workers),
            deps=["data/tokenizer"]))
        return step, prefix

    def build_data(self) -> None:
        cfg = self.cfg
        self.add(Step("data/tokenizer", "data", Path(f"{self.tokenizer}.model"), python(
            "data_tools", "train-tokenizer", "--input", self.subset_file("generic"),
            "--vocab-size", cfg.vocab_size, "--output", self.tokenizer)))
        self.data = {"generic": self.dataset("generic", self.subset_file("generic")),
                     "generic_test": self.dataset("generic_test",
                                                  self.corpus_file("generic", "test"))}
        for d in cfg.domains:
            for split in ("valid", "test"):
                self.data[f"{d}_{split}"] = self.dataset(f"{d}_{split}",
                                                         self.corpus_file(d, split))
            for size in cfg.spec_sizes:
                self.data[f"{d}_{size}"] = self.dataset(f"{d}_{size}",
                                                        self.subset_file(f"{d}_{size}"))
        # the clusterings the methods use: PN's for the methods that see clusters (SLM-pn,
        # SLM-cond, SLM-mix) and curves, SLM-is's own
        uses = [use for use, used in (
            ("pn", bool(cfg.curves) or any(self.sees_clusters(m) for m in cfg.methods)),
            ("is", "is" in cfg.methods)) if used]
        if not uses:
            return
        embeddings = self.out / "embeddings" / "generic"
        self.add(Step("data/embed", "data", embeddings / "meta.json", python(
            "data_tools", "embed", "--data-prefix", self.data["generic"][1], "--tokenizer-model",
            f"{self.tokenizer}.model", "--output", embeddings), [self.data["generic"][0]]))
        for use in uses:
            self.add(Step(f"data/cluster/{use}", "data", self.clusters(use) / "clusters.json",
                          python("data_tools", "cluster", "--embeddings", embeddings, "--k",
                                 cfg.clusters[use], "--output", self.clusters(use)),
                          ["data/embed"]))
        if "pn" in uses:
            self.assign("pn", "generic_test")  # generic perplexity, window by window's expert
        for d in cfg.domains:
            for size in cfg.spec_sizes:
                for use in uses:
                    self.assign(use, f"{d}_{size}")
                if "is" in cfg.methods:
                    self.importance(d, size)

    def clusters(self, use: str) -> Path:
        return self.out / "clusters" / use

    def assign_dir(self, use: str, name: str) -> Path:
        return self.out / "assign" / use / name

    def assign(self, use: str, name: str) -> str:
        target = self.assign_dir(use, name)
        step, prefix = self.data[name]
        return self.add(Step(f"data/assign/{use}/{name}", "data", target / HISTOGRAM,
                             python("data_tools", "assign", "--data-prefix", prefix,
                                    "--clusters", self.clusters(use), "--output", target),
                             [step, f"data/cluster/{use}"]))

    def importance_file(self, d: str, size: str) -> Path:
        return self.out / "importance" / f"{d}_{size}.json"

    def importance(self, d: str, size: str) -> str:
        method = self.cfg.methods["is"]
        tokens = max(method.budgets) * self.tokens_per_step(method.config)
        return self.add(Step(f"data/importance/{d}_{size}", "data", self.importance_file(d, size),
                             python("data_tools", "importance", "--generic", self.clusters("is"),
                                    "--spec", self.assign_dir("is", f"{d}_{size}"),
                                    "--target-tokens", tokens,
                                    "--output", self.importance_file(d, size)),
                             [f"data/assign/is/{d}_{size}"]))

    @staticmethod
    def tokens_per_step(config: str) -> int:
        from megatron_pn.config import load_config

        train_cfg = load_config([config])
        return train_cfg.train.global_batch_size * train_cfg.model.seq_length

    # -- the methods' model families --------------------------------------------------------

    def family(self, method: str):
        """The model family of a method's config (SLM-is and SLM-d train the SLM: dense)."""
        return config_family(self.cfg.methods[method].config)

    def sees_clusters(self, method: str) -> bool:
        """Pretrained on the PN clustering's per-cluster datasets, each sequence's cluster known:
        a routed family (SLM-pn, SLM-cond) or one job per cluster (SLM-mix)."""
        family = self.family(method)
        return family.routed or family.per_cluster_jobs

    def generic_methods(self) -> list[str]:
        """The methods pretrained once for all domains (not SLM-is or SLM-d), config order."""
        return [m for m in self.cfg.methods if m not in ("is", "distill")]

    # -- pretraining ---------------------------------------------------------------------------

    def pretrain_dir(self, method: str, budget: int, tag: str = "") -> Path:
        base = self.out / "pretrain" / method
        return (base / tag if tag else base) / f"b{budget}"

    def budgets(self, method: str) -> list:
        """The method's pretraining budgets ([] when the experiment leaves it out)."""
        spec = self.cfg.methods.get(method)
        return spec.budgets if spec else []

    def pretrain(self, method: str, budget: int, data: list, deps: list, tag: str = "",
                 expert: int | None = None) -> str:
        spec = self.cfg.methods[method]
        run = self.pretrain_dir(method, budget, tag)
        ckpt = run / "ckpt"
        args = [spec.config, *data, f"data.tokenizer_model={self.tokenizer}.model",
                f"model.vocab_size={self.cfg.vocab_size}", f"train.steps={budget}",
                "train.eval_interval=0", "logging.phase=pretrain", f"logging.run_dir={run}",
                f"checkpoint.dir={ckpt}", *self.cfg.pretrain_overrides, *spec.overrides]
        done = finished(run)
        name = f"pretrain/{method}/{tag + '/' if tag else ''}b{budget}"
        if expert is not None:  # SLM-mix appends expert_NNNN to the run and checkpoint dirs
            args.append(f"data.expert={expert}")
            done = finished(run / expert_dir(expert))
            name += "/" + expert_dir(expert)
        return self.add(Step(name, "pretrain", done, python("megatron_pn.cli.train", *args,
                                                            procs=spec.procs), deps, spec.procs))

    def build_pretraining(self) -> None:
        cfg, generic = self.cfg, self.data["generic"]
        # One expert per cluster of the PN clustering, for SLM-pn and SLM-mix alike; documents
        # split 80/20 within each cluster so that small clusters keep validation windows.
        per_cluster = [f"data.blend_file={self.clusters('pn') / 'generic_blend.json'}",
                       "data.split=80,20,0", f"model.num_experts={cfg.clusters['pn']}"]
        for method in self.generic_methods():
            family = self.family(method)
            for b in self.budgets(method):
                if family.per_cluster_jobs:  # SLM-mix: one dense SLM per cluster
                    for e in range(cfg.clusters["pn"]):
                        self.pretrain(method, b, per_cluster, ["data/cluster/pn"], expert=e)
                elif family.routed:  # SLM-pn, SLM-cond: every sequence with its cluster
                    self.pretrain(method, b, per_cluster, ["data/cluster/pn"])
                else:
                    self.pretrain(method, b, [f"data.blend=[{generic[1]}]"], [generic[0]])
        for b in self.budgets("is"):
            for d in cfg.domains:
                for size in cfg.spec_sizes:
                    # the resampled generic set replaces the config's data.blend
                    self.pretrain("is", b, ["data.blend=[]",
                                            f"data.blend_file={self.importance_file(d, size)}"],
                                  [f"data/importance/{d}_{size}"], tag=f"{d}_{size}")

    # -- specialization ------------------------------------------------------------------------

    def spec_dir(self, method: str, budget: int, d: str, size: str) -> Path:
        return self.out / "spec" / method / f"b{budget}" / f"{d}_{size}"

    def source(self, method: str, b: int, d: str, size: str) -> tuple[Path, list]:
        """The checkpoint a fine-tuning starts from, and the steps that make it."""
        if method == "is":
            return (self.pretrain_dir("is", b, f"{d}_{size}") / "ckpt",
                    [f"pretrain/is/{d}_{size}/b{b}"])
        family = self.family(method)
        if family.projectable:  # in closed form: the spec set's most frequent cluster, or
            # (mixture-trained) its cluster histogram
            return self.projection(method, b, d, size, self.projection_strategy(method),
                                   self.spec_dir(method, b, d, size) / "source")
        if family.per_cluster_jobs:  # SLM-mix: the expert of the most frequent cluster
            target = self.spec_dir(method, b, d, size) / "source"
            experts = self.pretrain_dir(method, b) / "ckpt"
            deps = [f"pretrain/{method}/b{b}/{expert_dir(e)}"
                    for e in range(self.cfg.clusters["pn"])]
            step = self.add(Step(f"project/{method}/b{b}/{d}_{size}", "project",
                                 target / "expert.json", python(
                                     "megatron_pn.cli.experiment", "pick-mix-expert", "--experts",
                                     experts, "--spec-data", self.assign_dir("pn", f"{d}_{size}"),
                                     "--output", target),
                                 [*deps, f"data/assign/pn/{d}_{size}"]))
            return target / "expert", [step]
        ckpt = self.pretrain_dir(method, b) / "ckpt"
        return ckpt, [f"pretrain/{method}/b{b}"]

    def projection_strategy(self, method: str) -> str:
        """A mixture-trained PN becomes a domain's model from its histogram; others take the
        expert of the most frequent cluster (the paper)."""
        trained = method_config(self.cfg.methods[method])
        return "most-frequent" if trained.data.mixture == "none" else "histogram"

    def projection(self, method: str, b: int, d: str, size: str, strategy: str, target: Path):
        ckpt = self.pretrain_dir(method, b) / "ckpt"
        step = self.add(Step(f"project/{method}/b{b}/{d}_{size}/{strategy}", "project",
                             target / "projection.json", python(
                                 "megatron_pn.cli.project", "--checkpoint", ckpt, "--spec-data",
                                 self.assign_dir("pn", f"{d}_{size}"), "--strategy", strategy,
                                 "--output", target),
                             [f"pretrain/{method}/b{b}", f"data/assign/pn/{d}_{size}"]))
        return target, [step]

    def finetune(self, name: str, run: Path, source: Path, deps: list, d: str, size: str,
                 extra: tuple = (), *, config: str, lora: bool = False) -> str:
        cfg = self.cfg
        configs = [config, cfg.finetune_config, *([cfg.lora_config] if lora else [])]
        args = [*configs, f"checkpoint.load={source}", f"checkpoint.dir={run / 'ckpt'}",
                f"data.blend=[{self.data[f'{d}_{size}'][1]}]",
                f"data.valid_blend=[{self.data[f'{d}_valid'][1]}]",
                f"data.tokenizer_model={self.tokenizer}.model",
                f"model.vocab_size={cfg.vocab_size}", f"logging.run_dir={run}",
                f"train.steps={cfg.finetune_steps[size]}", *cfg.finetune_overrides, *extra]
        return self.add(Step(name, "finetune", finished(run),
                             python("megatron_pn.cli.train", *args),
                             [*deps, self.data[f"{d}_{size}"][0], self.data[f"{d}_valid"][0]]))

    def evaluation(self, name: str, checkpoint: Path, data: str, output: Path, deps: list,
                   **options) -> str:
        step, prefix = self.data[data]
        job = {"checkpoint": str(checkpoint), "data": str(prefix), "names": data,
               "output": str(output), "max_tokens": self.cfg.test_max_tokens, **options}
        return self.add(Step(name, "eval", output, deps=[*deps, step], eval_job=job))

    def model_config(self, method: str) -> str:
        return self.cfg.methods["llm" if method == "llm" else "slm"].config

    def build_specialization(self) -> None:
        cfg = self.cfg
        for method in [m for m in cfg.methods if m != "distill"]:
            for b in self.budgets(method):
                for d in cfg.domains:
                    for size in cfg.spec_sizes:
                        self.specialize(method, b, d, size)
        if "distill" in cfg.methods:
            for b_slm, b_llm in zip(cfg.methods["slm"].budgets, cfg.methods["llm"].budgets):
                for d in cfg.domains:
                    for size in cfg.spec_sizes:
                        self.distill(b_slm, b_llm, d, size)

    def specialize(self, method: str, b: int, d: str, size: str) -> None:
        spec = self.spec_dir(method, b, d, size)
        source, deps = self.source(method, b, d, size)
        key = f"{method}/b{b}/{d}_{size}"
        self.evaluation(f"eval/before/{key}", source, f"{d}_test", spec / "eval_before.json", deps)
        ft = self.finetune(f"finetune/{key}", spec / "ft", source, deps, d, size,
                           config=self.model_config(method))
        self.evaluation(f"eval/after/{key}", spec / "ft" / "ckpt", f"{d}_test",
                        spec / "eval_after.json", [ft])
        if method in self.cfg.lora_rows:  # the same model fine-tuned with adapters
            adapted = self.spec_dir(method + LORA, b, d, size)
            key = f"{method + LORA}/b{b}/{d}_{size}"
            ft = self.finetune(f"finetune/{key}", adapted / "ft", source, deps, d, size,
                               config=self.model_config(method), lora=True)
            self.evaluation(f"eval/after/{key}", adapted / "ft" / "ckpt", f"{d}_test",
                            adapted / "eval_after.json", [ft])

    def build_exports(self) -> None:
        """Fine-tuned models to Hugging Face format (the config's export_hf)."""
        size = self.cfg.smallest_size
        for method, domains in self.cfg.export_hf.items():
            b = max(self.budgets(method))
            for d in domains:
                target = self.out / "hf" / method / d
                self.add(Step(f"export/{method}/{d}", "export", target / "config.json", python(
                    "megatron_pn.cli.hf", "--checkpoint", self.spec_dir(method, b, d, size) / "ft"
                    / "ckpt", "--output", target, "--tokenizer", f"{self.tokenizer}_hf"),
                    [f"finetune/{method}/b{b}/{d}_{size}"]))

    def distill(self, b_slm: int, b_llm: int, d: str, size: str) -> None:
        spec = self.spec_dir("distill", b_slm, d, size)
        student = self.pretrain_dir("slm", b_slm) / "ckpt"
        teacher = self.spec_dir("llm", b_llm, d, size) / "ft" / "ckpt"
        key = f"distill/b{b_slm}/{d}_{size}"
        options = (f"distill.teacher={teacher}",
                   *(f"distill.{key}={value}" for key, value in self.cfg.distill.items()))
        ft = self.finetune(f"finetune/{key}", spec / "ft", student,
                           [f"pretrain/slm/b{b_slm}", f"finetune/llm/b{b_llm}/{d}_{size}"], d, size,
                           options, config=self.model_config("slm"))
        self.evaluation(f"eval/after/{key}", spec / "ft" / "ckpt", f"{d}_test",
                        spec / "eval_after.json", [ft])

    def build_generic_evals(self) -> None:
        cfg = self.cfg
        for method in self.generic_methods():
            per_job = self.family(method).per_cluster_jobs
            for b in self.budgets(method):
                run = self.pretrain_dir(method, b)
                if not self.sees_clusters(method):
                    self.evaluation(f"eval/generic/{method}/b{b}", run / "ckpt", "generic_test",
                                    run / "eval_generic.json", [f"pretrain/{method}/b{b}"])
                    continue
                # SLM-pn, SLM-cond, SLM-mix: each generic window with its cluster (its expert)
                assign = str(self.assign_dir("pn", "generic_test"))
                for e in range(cfg.clusters["pn"]):
                    sub = expert_dir(e) if per_job else ""
                    ckpt = run / "ckpt" / sub
                    deps = [f"pretrain/{method}/b{b}" + (f"/{sub}" if sub else ""),
                            "data/assign/pn/generic_test"]
                    self.evaluation(f"eval/generic/{method}/b{b}/cluster_{e:04d}", ckpt,
                                    "generic_test", run / f"eval_generic_cluster_{e:04d}.json",
                                    deps, cluster_ids_from=assign, only_cluster=e)

    # -- Table 5: expert selection strategies --------------------------------------------------

    def build_strategies(self) -> None:
        cfg = self.cfg
        if not cfg.strategies or "pn" not in cfg.methods:
            return
        b, size = max(cfg.methods["pn"].budgets), cfg.smallest_size
        for d in cfg.domains:
            root = self.out / "strategies" / f"{d}_{size}"
            choices = [*STRATEGIES[1:], *(f"cluster={e}" for e in range(cfg.clusters["pn"]))]
            for strategy in choices:
                spec = root / strategy.replace("=", "_")
                source, deps = self.projection("pn", b, d, size, strategy, spec / "source")
                key = f"strategies/{d}_{size}/{strategy}"
                self.evaluation(f"eval/before/{key}", source, f"{d}_test",
                                spec / "eval_before.json", deps)
                if strategy == "best-loss":
                    continue  # its expert is one of the cluster=I runs
                ft = self.finetune(f"finetune/{key}", spec / "ft", source, deps, d, size,
                                   config=self.model_config("pn"))
                self.evaluation(f"eval/after/{key}", spec / "ft" / "ckpt", f"{d}_test",
                                spec / "eval_after.json", [ft])

    # -- learning curves -----------------------------------------------------------------------

    def curve_dir(self, variant: str, seed: int) -> Path:
        return self.out / "curves" / variant / f"s{seed}"

    def build_curves(self) -> None:
        """Every variant x seed pretrained on the PN clustering's data (the same documents for
        dense and PN models) and evaluated every eval_interval steps on the generic test set
        and each domain's valid set; a PN routes each window to its cluster's expert."""
        curves = self.cfg.curves
        if not curves:
            return
        sets = {"generic": "generic_test", **{d: f"{d}_valid" for d in self.cfg.domains}}
        deps = ["data/cluster/pn"]
        for data in sets.values():
            deps += [self.assign("pn", data), self.data[data][0]]
        k = self.cfg.clusters["pn"]
        for variant, spec in curves.variants.items():
            family = config_family(spec["config"])
            # windows by cluster: a routed model's expert, or (one job per cluster) its own
            routed = family.routed or family.per_cluster_jobs
            eval_sets = [[name, str(self.data[data][1]), *([str(self.assign_dir("pn", data))]
                                                           if routed else [])]
                         for name, data in sets.items()]
            # SLM-mix: k dense jobs, one per cluster, of steps / k each (the same tokens in all)
            jobs = [(e, [f"data.expert={e}"]) for e in range(k)] if family.per_cluster_jobs \
                else [(None, [])]
            share = k if family.per_cluster_jobs else 1
            for seed in curves.seeds:
                run = self.curve_dir(variant, seed)
                args = [spec["config"], "data.blend=[]",
                        f"data.blend_file={self.clusters('pn') / 'generic_blend.json'}",
                        "data.split=80,20,0", f"data.tokenizer_model={self.tokenizer}.model",
                        f"model.vocab_size={self.cfg.vocab_size}",
                        f"train.steps={curves.steps // share}", f"train.seed={seed}",
                        f"train.eval_interval={curves.eval_interval // share}",
                        "train.eval_sets=" + yaml_flow(eval_sets),
                        f"train.eval_sets_max_tokens={curves.eval_max_tokens}",
                        "logging.phase=pretrain", f"logging.run_dir={run}", "checkpoint.dir=null",
                        *([f"model.num_experts={k}"] if routed else []),
                        *self.cfg.pretrain_overrides, *spec.get("overrides", [])]
                for expert, extra in jobs:
                    sub = "" if expert is None else "/" + expert_dir(expert)
                    self.add(Step(f"curves/{variant}/s{seed}{sub}", "pretrain",
                                  finished(Path(f"{run}{sub}")),
                                  python("megatron_pn.cli.train", *args, *extra), deps))

    def build(self) -> dict[str, Step]:
        self.build_data()
        self.build_curves()
        self.build_pretraining()
        self.build_generic_evals()
        self.build_specialization()
        self.build_strategies()
        self.build_exports()
        return self.steps


def yaml_flow(value: list) -> str:
    """A list of lists as one command-line YAML value: [[a,b],[c,d]]."""
    if isinstance(value, list):
        return "[" + ",".join(yaml_flow(v) for v in value) + "]"
    return str(value)


def build_grid(cfg: ExperimentConfig, out: Path) -> Grid:
    grid = Grid(cfg, out)
    grid.build()
    return grid
