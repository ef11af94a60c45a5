"""`pn-plan`: which method to use for N domains (megatron_pn/experiment/plan.py has the
comparison it prints)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megatron_pn.experiment import plan as planning
from megatron_pn.experiment.plan import PlanError, parse_count, plan, render
from pn_base.errors import ArgumentParser, run_command


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="pn-plan", description=planning.__doc__.splitlines()[0],
        epilog=planning.__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", required=True,
                        help="results.json written by `pn-experiment run`/`report`")
    parser.add_argument("--domains", type=int, required=True, help="number of domains N")
    parser.add_argument("--spec-size", required=True,
                        help="spec-set size: a size name of the experiment, or tokens (nearest)")
    parser.add_argument("--inference-budget", help="largest model allowed at inference, in "
                        "parameters (e.g. 126M); default: no limit")
    parser.add_argument("--budget", type=float, help="total compute for all N domains, in the "
                        "results' device-hours times --scale (default: the largest cost every "
                        "eligible method was measured at)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply measured costs by this (e.g. to another device or scale)")
    parser.add_argument("--unit", default="device-hours", help="name of the cost unit shown")
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command("pn-plan", lambda: _plan_main(args))


def _plan_main(args) -> int:
    path = Path(args.results)
    if not path.is_file():
        raise PlanError(f"--results {path} not found (run `pn-experiment run` first)")
    try:
        results = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PlanError(f"--results {path}: not valid JSON ({err}); rerun "
                        "`pn-experiment report` on the experiment's directory") from None
    budget = None if args.inference_budget is None else parse_count(args.inference_budget)
    result = plan(results, args.domains, args.spec_size, budget, args.budget, args.scale)
    print(json.dumps(result, indent=1) if args.json else render(result, args.unit))
    return 0


if __name__ == "__main__":
    sys.exit(main())
