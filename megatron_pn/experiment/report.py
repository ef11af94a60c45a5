"""From an experiment's outputs to results.json, tables.md (Tables 8 and 5 of the paper) and the
plots (Figs. 4 and 6).

Costs are device-hours from each run's cost.json (megatron_pn.costs: on a CPU, its CPU time). Per method:
  C_generic  SLM, LLM, SLM-pn, SLM-cond: the pretraining run; SLM-mix: the sum over its
             experts; SLM-d: the SLM's plus the LLM's; SLM-is: 0 (nothing shared across domains).
  C_spec     the fine-tuning run (per domain and spec size), plus: SLM-pn and SLM-cond the
             projection, SLM-is its own pretraining, SLM-d the teacher's (LLM) fine-tuning.
             A LoRA row (METHOD+lora) counts its LoRA fine-tuning run instead, measured like
             every run: what a LoRA step really costs (megatron-core skips the frozen weights'
             weight-gradient GEMMs, the optimizer updates the adapters alone), not a formula.
Perplexities are macro-averages over domains (mean NLL per token, then exp) on each domain's
test split; generic perplexity is on the generic test split (SLM-pn, SLM-cond, SLM-mix: each
window with its cluster, or its cluster's expert).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from megatron_pn.costs import device_hours as logged_device_hours
from megatron_pn.costs import interpolate_at_cost, macro_average, shared_machine, total_cost
from megatron_pn.experiment.config import (LABELS, LORA, ExperimentConfig, config_family,
                                           load_experiment)
from megatron_pn.experiment.grid import Grid
from pn_base.errors import ConfigError
from pn_base.fileio import atomic_write_figure, atomic_write_json, atomic_write_text
from pn_base.outputs import COST, FINISHED, HISTOGRAM, METRICS, expert_dir

# pretrained once for all domains (Table 8)
GENERIC_METHODS = ("slm", "llm", "pn", "pnmix", "cond", "mix")
# Table 5's row of the mixture-trained PN (its largest budget): the spec set's histogram
MIXTURE_ROW = "histogram, SLM-pn-mixture"


def read_json(path: Path) -> dict | None:
    """A JSON output of the experiment; None while it does not exist."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid JSON ({err}); delete it and rerun the step that "
                          "writes it (pn-experiment run skips the others)") from None


def cost_logs(out: Path) -> dict[Path, list[dict]]:
    """Every cost log of the experiment: run dir -> its entries (one per invocation)."""
    return {path.parent: read_json(path)["runs"] for path in sorted(out.glob(f"**/{COST}"))}


def shared_runs(logs: dict[Path, list[dict]]) -> set[Path]:
    """The run dirs of which an invocation shared the machine (costs.shared_machine)."""
    everything = [run for runs in logs.values() for run in runs]
    return {path for path, runs in logs.items()
            if any(shared_machine(run, everything) for run in runs)}


def test_nll(path: Path) -> float | None:
    result = read_json(path)
    return None if result is None else result["datasets"][0]["nll"]


def kept_valid_loss(run_dir: Path) -> float | None:
    """The validation loss of the checkpoint a fine-tuning kept (finished.json's best_step:
    with a selection margin, not always the lowest one logged)."""
    finished, path = read_json(run_dir / FINISHED), run_dir / METRICS
    if finished is None or not path.is_file():
        return None
    losses = [r["loss"] for r in map(json.loads, path.read_text().splitlines())
              if r.get("split") == "valid" and r["step"] == finished["best_step"]]
    return losses[-1] if losses else None


def pooled_nll(paths: list[Path]) -> float | None:
    """Token-weighted NLL over evaluations of disjoint window sets (one per cluster)."""
    parts = [read_json(p) for p in paths if p.is_file()]
    if not parts or len(parts) < len(paths):
        return None
    sets = [p["datasets"][0] for p in parts if p["datasets"][0]["tokens"]]  # absent clusters
    return sum(s["nll"] * s["tokens"] for s in sets) / sum(s["tokens"] for s in sets)


# ---------------------------------------------------------------------------------------------
# Collecting


class Collector:
    def __init__(self, cfg: ExperimentConfig, out: Path, alone_only: bool = False):
        self.cfg, self.out = cfg, out
        self.grid = Grid(cfg, out)  # the layout of the outputs
        self.shared = shared_runs(cost_logs(out))  # runs that did not have the machine alone
        self.alone_only = alone_only  # their costs left out (None) rather than flagged

    def device_hours(self, run_dir: Path) -> float | None:
        """A run's device-hours from its cost log; None while it has none (not run yet), or
        when it shared the machine and only runs made alone count."""
        if self.alone_only and run_dir in self.shared:
            return None
        try:
            return logged_device_hours(run_dir)
        except FileNotFoundError:
            return None

    def generic_cost(self, method: str, i: int) -> float | None:
        methods = self.cfg.methods
        if method == "is":
            return 0.0
        if method == "distill":
            parts = [self.generic_cost("slm", i), self.generic_cost("llm", i)]
            return None if None in parts else sum(parts)
        run = self.grid.pretrain_dir(method, methods[method].budgets[i])
        if self.grid.family(method).per_cluster_jobs:  # SLM-mix: the sum over its experts
            parts = [self.device_hours(run / expert_dir(e))
                     for e in range(self.cfg.clusters["pn"])]
            return None if None in parts else sum(parts)
        return self.device_hours(run)

    def generic_nll(self, method: str, b: int) -> float | None:
        run = self.grid.pretrain_dir(method, b)
        if method in ("is", "distill"):
            return None
        if not self.grid.sees_clusters(method):
            return test_nll(run / "eval_generic.json")
        return pooled_nll([run / f"eval_generic_cluster_{e:04d}.json"
                           for e in range(self.cfg.clusters["pn"])])

    def spec_cost(self, method: str, i: int, d: str, size: str,
                  lora: bool = False) -> float | None:
        budgets = self.cfg.methods[method].budgets if method != "distill" else \
            self.cfg.methods["slm"].budgets
        b = budgets[i]
        spec = self.grid.spec_dir(method, b, d, size)
        tuned = self.grid.spec_dir(method + LORA, b, d, size) if lora else spec
        parts = [self.device_hours(tuned / "ft")]
        if self.grid.family(method).projectable:
            parts.append(self.projection_cost(spec))
        if method == "is":
            parts.append(self.device_hours(self.grid.pretrain_dir("is", b, f"{d}_{size}")))
        if method == "distill":
            b_llm = self.cfg.methods["llm"].budgets[i]
            parts.append(self.device_hours(self.grid.spec_dir("llm", b_llm, d, size) / "ft"))
        return None if None in parts else sum(parts)

    @staticmethod
    def projection_cost(spec: Path) -> float | None:
        """Device-hours of the closed-form projection (C_spec of a model used without
        fine-tuning)."""
        projection = read_json(spec / "source" / "projection.json")
        return None if projection is None else projection["seconds"] / 3600

    def method_rows(self, method: str, lora: bool = False) -> list[dict]:
        """The method's rows, one per budget; `lora`: its LoRA row (the same models before
        fine-tuning, fine-tuned with adapters)."""
        cfg = self.cfg
        budgets = cfg.methods["slm" if method == "distill" else method].budgets
        # a LoRA row's projected model without fine-tuning is its method's row already
        projectable = (method not in ("is", "distill") and self.grid.family(method).projectable
                       and not lora)
        name = method + LORA if lora else method
        rows = []
        for i, b in enumerate(budgets):
            row = {"method": name, "budget": b, "generic_cost": self.generic_cost(method, i),
                   "generic_nll": self.generic_nll(method, b), "sizes": {}}
            for size in cfg.spec_sizes:
                per_domain = {}
                for d in cfg.domains:
                    spec = self.grid.spec_dir(method, b, d, size)
                    tuned = self.grid.spec_dir(name, b, d, size)
                    per_domain[d] = {
                        "nll_before": test_nll(spec / "eval_before.json"),
                        "nll_after": test_nll(tuned / "eval_after.json"),
                        "spec_cost": self.spec_cost(method, i, d, size, lora),
                        "projection_cost": (self.projection_cost(spec) if projectable
                                            else None),
                        "ft_steps": _steps(tuned / "ft")}
                row["sizes"][size] = {"domains": per_domain, **macro(per_domain)}
            rows.append(row)
        return rows

    def strategies(self) -> dict | None:
        cfg = self.cfg
        if not cfg.strategies or "pn" not in cfg.methods:
            return None
        size, k = cfg.smallest_size, cfg.clusters["pn"]
        table = {}
        for d in cfg.domains:
            root = self.out / "strategies" / f"{d}_{size}"
            cluster = {e: root / f"cluster_{e}" for e in range(k)}
            hist = read_json(self.grid.assign_dir("pn", f"{d}_{size}") / HISTOGRAM)
            chosen = read_json(root / "best-loss" / "source" / "projection.json")
            if hist is None or chosen is None:
                continue
            frequent = int(np.argmax(hist["tokens"]))
            valid = {e: kept_valid_loss(cluster[e] / "ft") for e in range(k)}
            oracle = min((e for e in valid if valid[e] is not None), key=valid.get, default=None)
            entry = lambda before, after: {"nll_before": test_nll(before),  # noqa: E731
                                           "nll_after": test_nll(after)}
            table[d] = {
                "most-frequent": entry(cluster[frequent] / "eval_before.json",
                                       cluster[frequent] / "eval_after.json"),
                "best-loss": entry(root / "best-loss" / "eval_before.json",
                                   cluster[chosen["expert"]] / "eval_after.json"),
                "histogram": entry(root / "histogram" / "eval_before.json",
                                   root / "histogram" / "eval_after.json"),
                "fine-tune all, keep best": entry(
                    cluster[oracle] / "eval_before.json" if oracle is not None else Path("-"),
                    cluster[oracle] / "eval_after.json" if oracle is not None else Path("-")),
                "experts": {"most-frequent": frequent, "best-loss": chosen["expert"],
                            "fine-tune all, keep best": oracle}}
            if "pnmix" in cfg.methods:  # its histogram, instantiated by the trained map
                mixed = self.grid.spec_dir("pnmix", max(cfg.methods["pnmix"].budgets), d, size)
                table[d][MIXTURE_ROW] = entry(mixed / "eval_before.json",
                                              mixed / "eval_after.json")
        return {"size": size, "budget": max(cfg.methods["pn"].budgets), "k": k, "domains": table}

    def collect(self) -> dict:
        methods = {}
        for method in self.cfg.methods:  # each LoRA row after its method's
            methods[method] = self.method_rows(method)
            if method in self.cfg.lora_rows:
                methods[method + LORA] = self.method_rows(method, lora=True)
        parameters = self.parameters()  # (maybe cached from a report without LoRA rows)
        parameters.update({m + LORA: parameters[m] for m in self.cfg.lora_rows
                           if m in parameters})  # adapters merged: the method's own model
        return {"name": self.cfg.name, "domains": self.cfg.domains,
                "spec_sizes": {s: self.spec_tokens(s) for s in self.cfg.spec_sizes},
                "device": self.device(), "methods": methods, "strategies": self.strategies(),
                "parameters": parameters, "throughput": self.throughput(),
                "shared_machine": {"runs": sorted(str(p.relative_to(self.out))
                                                  for p in self.shared),
                                   "costs_left_out": self.alone_only}}

    def spec_tokens(self, size: str) -> int | None:
        counts = [read_json(Path(f"{self.grid.out / 'data' / f'{d}_{size}'}.json"))
                  for d in self.cfg.domains]
        tokens = [c.get("tokens") for c in counts if c]
        return int(np.mean(tokens)) if tokens else None

    def device(self) -> str | None:
        for log in sorted(self.out.glob(f"pretrain/*/b*/{COST}")):
            return read_json(log)["runs"][0]["device"]
        return None

    def throughput(self) -> dict:
        """Tokens per device-second of each method's pretraining runs (from the cost logs)."""
        speeds = {}
        for method in GENERIC_METHODS:
            counted = [(read_json(p)["total_tokens"], self.device_hours(p.parent))
                       for p in self.out.glob(f"pretrain/{method}/b*/**/{COST}")]
            counted = [(tokens, hours) for tokens, hours in counted if hours is not None]
            tokens, hours = sum(t for t, _ in counted), sum(h for _, h in counted)
            if hours:
                speeds[method] = tokens / (hours * 3600)
        return speeds

    def parameters(self) -> dict:
        """(pretraining, inference) parameter counts (pn-train --dry-run's)."""
        from megatron_pn.checks import check_model
        from megatron_pn.config import load_config
        from megatron_pn.model import parameter_counts

        counts = {}
        for method, spec in self.cfg.methods.items():
            config = self.cfg.methods["slm"].config if method in ("is", "distill") else spec.config
            method_cfg = load_config([config], [*([] if method in ("is", "distill") else
                                                  spec.overrides),
                                                f"model.vocab_size={self.cfg.vocab_size}"])
            check_model(method_cfg)
            model = parameter_counts(method_cfg)
            total, expert = model["total"], model["expert"]
            if config_family(config).per_cluster_jobs:  # SLM-mix: k dense SLMs
                total, expert = total * self.cfg.clusters["pn"], total
            counts[method] = {"pretrain": total, "inference": expert or total}
        return counts


def _steps(run_dir: Path) -> int | None:
    log = read_json(run_dir / COST)
    return None if log is None else sum(r["steps"] for r in log["runs"])


def macro(per_domain: dict) -> dict:
    """Macro-averages over the domains (None until every domain has its number)."""
    return {key: macro_average(v[key] for v in per_domain.values())
            for key in ("nll_before", "nll_after", "spec_cost", "projection_cost")}


# ---------------------------------------------------------------------------------------------
# Tables


def ppl(nll: float | None) -> str:
    return "–" if nll is None else f"{math.exp(nll):.1f}"


def cost_unit(results: dict) -> tuple[str, float]:
    """(name, factor from device-hours): device-seconds for small runs, device-hours (the
    paper's GPU-hours) once a pretraining costs an hour."""
    costs = [r["generic_cost"] or 0 for rows in results["methods"].values() for r in rows]
    return ("device-hours", 1.0) if max(costs, default=0) >= 1 else ("device-seconds", 3600.0)


def fmt_cost(hours: float | None, unit: tuple[str, float]) -> str:
    return "–" if hours is None else f"{hours * unit[1]:.3g}"


def common_cost_range(results: dict) -> tuple[float, float] | None:
    ranges = []
    for method in GENERIC_METHODS:
        costs = [r["generic_cost"] for r in results["methods"].get(method, [])
                 if r["generic_cost"]]
        if costs:
            ranges.append((min(costs), max(costs)))
    if not ranges:
        return None
    low, high = max(r[0] for r in ranges), min(r[1] for r in ranges)
    return (low, high) if low <= high else None


def at_cost(rows: list[dict], value, target: float) -> float | None:
    """A row value interpolated at pretraining cost `target` (log-cost), None if unmeasured."""
    points = [(r["generic_cost"], value(r)) for r in rows]
    points = [(c, v) for c, v in points if c and v is not None]
    if len(points) < 2:
        return None
    costs, values = zip(*points)
    try:
        return interpolate_at_cost(costs, values, target)
    except ValueError:
        return None


def table8(results: dict, target: float | None) -> str:
    unit = cost_unit(results)
    sizes = list(results["spec_sizes"])
    first = sizes[0]
    span = common_cost_range(results)
    if target is None and span is None:
        return ("Table 8: the methods' pretraining costs do not overlap; measure more budgets "
                "(or pass --target-cost).\n")
    if target is None:
        target = math.sqrt(span[0] * span[1])
    header = ["method", "generic ppl", f"spec ppl no ft ({first})",
              *(f"spec ppl ft {s}" for s in sizes)]
    lines = [f"Table 8 (interpolated at {fmt_cost(target, unit)} {unit[0]} of pretraining; "
             f"macro-averaged test perplexity over {len(results['domains'])} domains)", "",
             "| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    for method in (m + lora for m in GENERIC_METHODS for lora in ("", LORA)):
        rows = results["methods"].get(method)
        if not rows:
            continue
        cells = [at_cost(rows, lambda r: r["generic_nll"], target),
                 at_cost(rows, lambda r: r["sizes"][first]["nll_before"], target),
                 *(at_cost(rows, lambda r, s=s: r["sizes"][s]["nll_after"], target)
                   for s in sizes)]
        lines.append(f"| {LABELS[method]} | " + " | ".join(ppl(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def budgets_table(results: dict) -> str:
    unit = cost_unit(results)
    sizes = list(results["spec_sizes"])
    header = ["method", "budget (steps)", "C_generic", "generic ppl",
              *(f"no ft {s}" for s in sizes), *(f"ft {s}" for s in sizes),
              *(f"C_spec {s}" for s in sizes)]
    lines = [f"All runs (macro-averaged test perplexity; costs in {unit[0]}, C_spec per "
             "domain)", "", "| " + " | ".join(header) + " |",
             "|---" + "|---:" * (len(header) - 1) + "|"]
    for method, rows in results["methods"].items():
        for r in rows:
            cells = [fmt_cost(r["generic_cost"], unit), ppl(r["generic_nll"]),
                     *(ppl(r["sizes"][s]["nll_before"]) for s in sizes),
                     *(ppl(r["sizes"][s]["nll_after"]) for s in sizes),
                     *(fmt_cost(r["sizes"][s]["spec_cost"], unit) for s in sizes)]
            lines.append(f"| {LABELS[method]} | {r['budget']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def domains_table(results: dict) -> str:
    """Per domain, at each method's largest budget: the test perplexity of the small model
    before fine-tuning (the pretrained SLM/LLM, the projected expert, ...) and after."""
    methods = {m: max(rows, key=lambda r: r["budget"]) for m, rows in results["methods"].items()}
    header = ["domain", *(f"{LABELS[m]} {when}" for m in methods
                          for when in ("no ft", "ft"))]
    text = []
    for size in results["spec_sizes"]:
        lines = [f"Per domain, spec size {size} (test perplexity; "
                 + ", ".join(f"{LABELS[m]} {r['budget']} steps" for m, r in methods.items())
                 + ")", "", "| " + " | ".join(header) + " |",
                 "|---" + "|---:" * (len(header) - 1) + "|"]
        for d in [*results["domains"], None]:
            cells = []
            for r in methods.values():
                entry = r["sizes"][size]["domains"][d] if d else r["sizes"][size]
                cells += [ppl(entry["nll_before"]), ppl(entry["nll_after"])]
            lines.append(f"| {d or '**macro-average**'} | " + " | ".join(cells) + " |")
        text.append("\n".join(lines) + "\n")
    return "\n".join(text)


def table5(results: dict) -> str:
    strategies = results.get("strategies")
    if not strategies or not strategies["domains"]:
        return ""
    names = ["most-frequent", "best-loss", "histogram", "fine-tune all, keep best"]
    if any(MIXTURE_ROW in d for d in strategies["domains"].values()):
        names.append(MIXTURE_ROW)
    cost = {"most-frequent": "1x", "best-loss": "1x (+ scoring k experts)", "histogram": "1x",
            "fine-tune all, keep best": f"{strategies['k']}x", MIXTURE_ROW: "1x"}
    lines = [f"Table 5 (expert selection; SLM-pn at {strategies['budget']} steps, spec set "
             f"{strategies['size']}; macro-averaged test perplexity over "
             f"{len(strategies['domains'])} domains)", "",
             "| strategy | fine-tuning cost | ppl before ft | ppl after ft |", "|---|---|---:|---:|"]
    for name in names:
        before = [d[name]["nll_before"] for d in strategies["domains"].values()]
        after = [d[name]["nll_after"] for d in strategies["domains"].values()]
        mean = lambda v: None if None in v else float(np.mean(v))  # noqa: E731
        lines.append(f"| {name} | {cost[name]} | {ppl(mean(before))} | {ppl(mean(after))} |")
    return "\n".join(lines) + "\n"


def cost_table(results: dict) -> str:
    """C_total(N) = C_generic + N * C_spec at each method's largest budget."""
    unit = cost_unit(results)
    size = list(results["spec_sizes"])[0]
    lines = [f"Total cost for N domains (largest budget of each method, spec set {size}; "
             f"{unit[0]})", "", "| method | C_generic | C_spec | N=1 | N=10 | N=100 |",
             "|---|---:|---:|---:|---:|---:|"]
    for method, rows in results["methods"].items():
        last = rows[-1]
        generic, spec = last["generic_cost"], last["sizes"][size]["spec_cost"]
        if generic is None or spec is None:
            continue
        totals = total_cost(generic, spec, np.array([1, 10, 100]))
        cells = [fmt_cost(c, unit) for c in (generic, spec, *totals)]
        lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Figures


def plot_fig4(results: dict, path: Path) -> None:
    """Spec perplexity (no ft, and after ft per spec size) against pretraining cost."""
    unit = cost_unit(results)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    sizes = list(results["spec_sizes"])
    panels = [("no fine-tuning", sizes[0], "nll_before"),
              *((f"fine-tuned on {s}", s, "nll_after") for s in sizes)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.8), squeeze=False)
    for ax, (title, size, key) in zip(axes[0], panels):
        for method, rows in results["methods"].items():
            if method == "is" and key == "nll_before":
                continue
            points = [(_x_cost(method, r, size), r["sizes"][size][key]) for r in rows]
            points = [(c * unit[1], math.exp(v)) for c, v in points if c and v is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label=LABELS[method])
        ax.set(title=title, xscale="log", xlabel=f"pretraining cost ({unit[0]})",
               ylabel="macro-avg spec perplexity")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # labels would overlap
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    fig.suptitle("Specialized perplexity vs pretraining cost (SLM-is: its per-domain "
                 "pretraining)", fontsize=10)
    fig.tight_layout()
    atomic_write_figure(path, fig, dpi=120)
    plt.close(fig)


def _x_cost(method: str, row: dict, size: str) -> float | None:
    if method == "is":  # no shared pretraining: its per-domain pretraining cost
        spec = row["sizes"][size]["spec_cost"]
        return spec
    return row["generic_cost"]


def plot_fig6(results: dict, path: Path) -> None:
    """C_total(N) = C_generic + N * C_spec against the number of domains N."""
    unit = cost_unit(results)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = list(results["spec_sizes"])[0]
    n = np.logspace(0, 3, 50)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for method, rows in results["methods"].items():
        last = rows[-1]
        generic, spec = last["generic_cost"], last["sizes"][size]["spec_cost"]
        if generic is not None and spec is not None:
            ax.plot(n, total_cost(generic, spec, n) * unit[1], label=LABELS[method])
    ax.set(xscale="log", yscale="log", xlabel="number of domains N",
           ylabel=f"total cost ({unit[0]})",
           title=f"C_total(N) = C_generic + N C_spec (largest budgets, {size})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write_figure(path, fig, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------


def write_report(out: Path, cfg: ExperimentConfig, target: float | None = None,
                 alone_only: bool = False) -> str:
    """tables.md, results.json and the figures of the methods; curves.md and curves.png of the
    learning curves (when the experiment has them). `alone_only`: costs of runs that shared the
    machine are left out (their cells empty) instead of flagged."""
    text = write_method_report(out, cfg, target, alone_only) if cfg.methods else ""
    if cfg.curves:
        from megatron_pn.experiment.curves import write_curves

        text += write_curves(out, cfg)
        print(text)
        print(f"curves: {out / 'curves.md'}, {out / 'curves.png'}")
    return text


def write_method_report(out: Path, cfg: ExperimentConfig, target: float | None,
                        alone_only: bool = False) -> str:
    cached = read_json(out / "results.json") or {}
    collector = Collector(cfg, out, alone_only)
    if cached.get("parameters"):
        collector.parameters = lambda: cached["parameters"]
    results = collector.collect()
    atomic_write_json(out / "results.json", results)
    text = "\n".join([f"# Experiment {cfg.name}: results", "",
                      f"Device: {results['device']}. Spec-set sizes (mean tokens): " + ", ".join(
                          f"{s} {t}" for s, t in results["spec_sizes"].items()), "",
                      shared_note(results["shared_machine"]),
                      table8(results, target), budgets_table(results), domains_table(results),
                      table5(results),
                      cost_table(results)])
    atomic_write_text(out / "tables.md", text)
    plot_fig4(results, out / "fig4_spec_ppl_vs_cost.png")
    plot_fig6(results, out / "fig6_total_cost.png")
    print(text)
    print(f"results: {out / 'results.json'}; plots: {out / 'fig4_spec_ppl_vs_cost.png'}, "
          f"{out / 'fig6_total_cost.png'}")
    exports = [out / "hf" / m / d for m, domains in cfg.export_hf.items() for d in domains]
    if exports:
        print("Hugging Face models: " + ", ".join(map(str, exports)))
    return text


def shared_note(shared: dict) -> str:
    """What the costs are made of: runs alone, or which shared the machine."""
    runs = shared["runs"]
    if not runs:
        return "Costs: every run had the machine to itself.\n"
    what = ("left out (empty cells)" if shared["costs_left_out"] else
            "counted; `pn-experiment report --alone-only` leaves them out")
    return (f"Costs: {len(runs)} runs shared the machine (another run of the experiment at the "
            f"same time, or a high load average; CPU-seconds rise then): {what}. They are listed "
            "in results.json (shared_machine); `--jobs 1` runs each step alone.\n")


def report_main(out: Path, target: float | None, alone_only: bool = False) -> int:
    meta = read_json(out / "experiment.json")
    if meta is None:
        raise FileNotFoundError(f"{out / 'experiment.json'} not found: not the output directory "
                                "of `pn-experiment run`")
    cfg = load_experiment(meta["config"], meta["overrides"])
    write_report(out, cfg, target, alone_only)
    return 0
