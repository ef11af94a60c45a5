"""`pn-plan`: which method to use for N domains — the paper's Fig. 1 as a tool.

From the measurements of `pn-experiment` (results.json: per method and pretraining budget, the
generic cost, the per-domain specialization cost and the specialized perplexity at each spec-set
size), it compares the methods whose inference model fits the budget at equal total cost

    C_total(N) = C_generic + N * C_spec

and recommends the one with the lowest predicted perplexity. A method that projects a domain's
model in closed form (SLM-pn, SLM-pn-mixture, SLM-cond) is also an option without fine-tuning,
its C_spec the projection alone. A method's perplexity at a total
cost is interpolated (linear in log-cost) between its measured budgets; below its smallest
budget it is not affordable; above its largest, its largest budget's perplexity is used (and
said). `--scale` maps measured costs to another setting (e.g. GPU-hours at paper scale from
the throughputs in the cost logs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from megatron_pn.experiment.config import LABELS
from pn_base.errors import UserError



class PlanError(UserError):
    pass


@dataclass
class Option:
    method: str
    inference_params: int
    totals: list  # C_total(N) at each measured budget, increasing
    nlls: list  # macro spec NLL after fine-tuning at those budgets
    budgets: list

    def nll_at(self, cost: float) -> tuple[float | None, str]:
        """(predicted NLL at total cost, how it was obtained); None if not affordable."""
        if cost < self.totals[0]:
            return None, f"needs at least {self.totals[0]:.4g}"
        if cost >= self.totals[-1]:
            note = "largest budget" + ("; more not measured" if cost > self.totals[-1] else "")
            return self.nlls[-1], note
        value = float(np.interp(math.log(cost), np.log(self.totals), self.nlls))
        return value, "interpolated"


def parse_count(text: str) -> float:
    """'126M' -> 126e6; also K, B, or a plain number."""
    units = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9}
    text = text.strip().lower()
    try:
        if text and text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError:
        raise PlanError(f"cannot read '{text}' as a number (e.g. 126M, 2.5e6)") from None


def spec_size(results: dict, wanted: str) -> str:
    """A spec-set size of the results: by name, or the nearest in tokens."""
    sizes = results["spec_sizes"]
    if wanted in sizes:
        return wanted
    tokens = parse_count(wanted)
    known = {s: t for s, t in sizes.items() if t}
    if not known:
        raise PlanError(f"--spec-size {wanted}: give one of {', '.join(sizes)}")
    return min(known, key=lambda s: abs(math.log(known[s] / tokens)))


NO_FINETUNING = " (no fine-tuning)"  # an option: the projected model as it comes


def options(results: dict, size: str, domains: int, scale: float) -> list[Option]:
    """Each method fine-tuned, and each projectable one also without fine-tuning (C_spec: the
    projection alone; the instant specialists of a mixture-trained PN)."""
    found = []
    for method, rows in results["methods"].items():
        params = results.get("parameters", {}).get(method, {}).get("inference", 0)
        for name, spec_key, nll_key in ((method, "spec_cost", "nll_after"),
                                        (method + NO_FINETUNING, "projection_cost",
                                         "nll_before")):
            points = []
            for row in rows:
                cell = row["sizes"].get(size, {})
                generic, spec, nll = row["generic_cost"], cell.get(spec_key), cell.get(nll_key)
                if None not in (generic, spec, nll):
                    points.append(((generic + domains * spec) * scale, nll, row["budget"]))
            if points:
                points.sort()
                found.append(Option(name, params, *map(list, zip(*points))))
    return found


def label(option: str) -> str:
    method, _, rest = option.partition(" ")
    return LABELS.get(method, method) + (" " + rest if rest else "")


def plan(results: dict, domains: int, size: str, inference_budget: float | None,
         budget: float | None, scale: float = 1.0) -> dict:
    if domains < 1:
        raise PlanError(f"--domains must be >= 1, got {domains}")
    size = spec_size(results, size)
    candidates = options(results, size, domains, scale)
    if not candidates:
        raise PlanError(f"the results hold no finished method for spec size {size}")
    fits = [o for o in candidates
            if inference_budget is None or o.inference_params <= inference_budget]
    excluded = [o for o in candidates if o not in fits]
    if not fits:
        raise PlanError(f"no method's inference model fits {inference_budget:.3g} parameters "
                        f"(smallest: {min(o.inference_params for o in candidates):,})")
    if budget is None:  # the largest cost every eligible method was measured at
        budget = min(o.totals[-1] for o in fits)
    rows = []
    for option in fits:
        nll, note = option.nll_at(budget)
        rows.append({"method": option.method, "nll": nll, "note": note,
                     "inference_params": option.inference_params,
                     "totals": option.totals, "nlls": option.nlls, "budgets": option.budgets})
    affordable = [r for r in rows if r["nll"] is not None]
    best = min(affordable, key=lambda r: r["nll"]) if affordable else None
    return {"domains": domains, "spec_size": size, "budget": budget, "scale": scale,
            "inference_budget": inference_budget, "rows": rows,
            "excluded": [{"method": o.method, "inference_params": o.inference_params}
                         for o in excluded],
            "recommendation": best["method"] if best else None,
            "throughput": results.get("throughput", {})}


def render(result: dict, unit: str) -> str:
    lines = [f"N = {result['domains']} domains, spec set {result['spec_size']}, total budget "
             f"{result['budget']:.4g} {unit} (C_total(N) = C_generic + N * C_spec)", "",
             "| method | inference params | C_total(N) at measured budgets | spec ppl there | "
             "predicted ppl at budget |", "|---|---:|---|---|---|"]
    for r in sorted(result["rows"], key=lambda r: (r["nll"] is None, r["nll"] or 0)):
        totals = ", ".join(f"{t:.3g}" for t in r["totals"])
        ppls = ", ".join(f"{math.exp(n):.1f}" for n in r["nlls"])
        predicted = "–" if r["nll"] is None else f"{math.exp(r['nll']):.2f}"
        lines.append(f"| {label(r['method'])} | {r['inference_params']:,} | "
                     f"{totals} | {ppls} | {predicted} ({r['note']}) |")
    for r in result["excluded"]:
        lines.append(f"| {label(r['method'])} | {r['inference_params']:,} | "
                     "over the inference budget | | |")
    if result.get("throughput"):
        lines += ["", "pretraining throughput in the cost logs (tokens per device-second): "
                  + ", ".join(f"{label(m)} {v:,.0f}"
                              for m, v in result["throughput"].items())]
    choice = result["recommendation"]
    lines += ["", f"recommendation: {label(choice)}" if choice else
              "recommendation: none affordable: raise --budget"]
    return "\n".join(lines)
