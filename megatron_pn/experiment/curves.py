"""Learning curves of an experiment's `curves` runs: generic and per-domain perplexity against
pretraining tokens, every variant on the same evaluation schedule, the spread over seeds.

Reads curves/<variant>/s<seed>/metrics.jsonl (the `eval/<set>` records pn-train writes for
train.eval_sets; SLM-mix: one per expert, pooled); writes curves.md (a table at a few points of training) and curves.png.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from megatron_pn.experiment.config import ExperimentConfig, config_family
from pn_base.fileio import atomic_write_figure, atomic_write_text
from pn_base.outputs import METRICS, expert_dir

MACRO = "domains (macro)"


def read_records(path: Path) -> dict:
    """(set, step) -> (loss, tokens) of a run's eval records (the last: a resumed run re-logs)."""
    records = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        record = json.loads(line)
        if record["split"].startswith("eval/"):
            records[record["split"][5:], record["step"]] = (record["loss"],
                                                            record.get("tokens", 1))
    return records


def pooled_mix_records(experts: list[dict]) -> dict:
    """SLM-mix: expert e evaluated on its cluster's windows at its step s is the mixture at step
    s x k (the same tokens as the other variants); the mixture's loss on a set is the
    token-weighted mean over the experts (once every expert has its record)."""
    k, pooled = len(experts), {}
    for key in set.intersection(*(set(r) for r in experts)):
        parts = [experts[e][key] for e in range(k) if experts[e][key][0] is not None]
        tokens = sum(t for _, t in parts)
        if tokens:
            pooled[key[0], key[1] * k] = (sum(loss * t for loss, t in parts) / tokens, tokens)
    return pooled


def read_curves(out: Path, cfg: ExperimentConfig) -> dict:
    """variant -> set -> step -> [loss of each seed]; MACRO: the mean over the domains."""
    curves: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    k = cfg.clusters["pn"]
    for variant, spec in cfg.curves.variants.items():
        per_cluster = config_family(spec["config"]).per_cluster_jobs  # SLM-mix: k runs
        for seed in cfg.curves.seeds:
            run = out / "curves" / variant / f"s{seed}"
            records = pooled_mix_records([read_records(run / expert_dir(e) / METRICS)
                                          for e in range(k)]) if per_cluster else \
                read_records(run / METRICS)
            losses = {key: loss for key, (loss, _) in records.items()}
            for (name, step), loss in losses.items():
                curves[variant][name][step].append(loss)
            for step in {step for _, step in losses}:
                domains = [losses.get((d, step)) for d in cfg.domains]
                if None not in domains:
                    curves[variant][MACRO][step].append(float(np.mean(domains)))
    return curves


def curves_table(curves: dict, cfg: ExperimentConfig) -> str:
    """Perplexity (mean over seeds, and half the min-max spread) at a few steps of training."""
    c = cfg.curves
    evals = list(range(c.eval_interval, c.steps + 1, c.eval_interval))
    shown = sorted({evals[max(0, round(len(evals) * f) - 1)] for f in (0.1, 0.25, 0.5, 1.0)})
    lines = [f"# Learning curves: {cfg.name}", "",
             f"Perplexity at steps {', '.join(map(str, shown))} of {c.steps} (mean over seeds "
             f"{c.seeds}, +- half the spread); generic: the generic test set (a PN routes each "
             "window to its cluster's expert); domains: macro-average over the valid sets of "
             f"{', '.join(cfg.domains)}.", ""]
    for name in ("generic", MACRO, *cfg.domains):
        lines += [f"## {name}", "", "| variant | " + " | ".join(f"step {s}" for s in shown) + " |",
                  "|---|" + "---:|" * len(shown)]
        for variant, sets in curves.items():
            cells = []
            for step in shown:
                losses = np.array(sets.get(name, {}).get(step, []))
                cells.append("-" if not len(losses) else
                             f"{np.exp(losses).mean():.1f} +- {np.ptp(np.exp(losses)) / 2:.1f}")
            lines.append(f"| {variant} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_curves(curves: dict, cfg: ExperimentConfig, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from megatron_pn.experiment.grid import Grid

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for variant, sets in curves.items():
        tokens_per_step = Grid.tokens_per_step(cfg.curves.variants[variant]["config"])
        for ax, name in zip(axes, ("generic", MACRO)):
            steps = sorted(sets.get(name, {}))
            if not steps:
                continue
            ppl = [np.exp(sets[name][s]) for s in steps]
            x = np.array(steps) * tokens_per_step
            line, = ax.plot(x, [p.mean() for p in ppl], label=variant)
            ax.fill_between(x, [p.min() for p in ppl], [p.max() for p in ppl],
                            color=line.get_color(), alpha=0.2)
    for ax, name in zip(axes, ("generic test", "domain valid sets (macro)")):
        ax.set(xlabel="pretraining tokens", ylabel="perplexity", yscale="log", title=name)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    atomic_write_figure(path, fig, dpi=120)
    plt.close(fig)


def write_curves(out: Path, cfg: ExperimentConfig) -> str:
    curves = read_curves(out, cfg)
    text = curves_table(curves, cfg)
    atomic_write_text(out / "curves.md", text)
    plot_curves(curves, cfg, out / "curves.png")
    return text
