"""`pn-experiment`: the paper's comparison (SLM, SLM-is, SLM-pn, SLM-mix, LLM, SLM-d) as one
command: pretrain each method at several budgets, specialize to every domain at several spec-set
sizes, fine-tune with early stopping, evaluate, then tables and plots.

    pn-experiment run configs/experiments/tiny.yaml             # on this machine
    pn-experiment run configs/experiments/paper.yaml --executor slurm
    pn-experiment report experiments_out/tiny                   # tables + plots from the runs
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from megatron_pn.experiment.config import load_experiment
from megatron_pn.experiment.grid import build_grid
from pn_base.errors import ArgumentParser, ConfigError, run_command
from pn_base.fileio import atomic_write_json
from pn_base.outputs import HISTOGRAM, expert_dir

EPILOG = """examples:
  pn-experiment run configs/experiments/tiny.yaml --jobs 2
  pn-experiment run configs/experiments/tiny.yaml domains=[bible] --out /tmp/exp
  pn-experiment list configs/experiments/tiny.yaml          # the steps and which are done
  pn-experiment run configs/experiments/paper.yaml --executor slurm
  pn-experiment report experiments_out/tiny --target-cost 0.05

A re-run skips finished steps. Outputs: OUT/results.json (every measurement), OUT/tables.md
(Tables 8 and 5), OUT/fig4_spec_ppl_vs_cost.png, OUT/fig6_total_cost.png, OUT/logs/ (one log
per step). `pn-plan --results OUT/results.json` recommends a method from these numbers."""


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="pn-experiment", description=__doc__.splitlines()[0],
                                     epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("run", "run every pending step, then report"),
                       ("list", "list the steps and whether each is done")):
        cmd = sub.add_parser(name, help=text, description=text)
        cmd.add_argument("config", help="experiment YAML (configs/experiments/)")
        cmd.add_argument("overrides", nargs="*", metavar="key=value",
                         help="overrides of the experiment config, e.g. domains=[bible]")
        cmd.add_argument("--out", help="output directory (default: experiments_out/<name>)")
        if name == "run":
            cmd.add_argument("--executor", choices=("local", "slurm"), default="local",
                             help="local: processes on this machine; slurm: one job per step")
            cmd.add_argument("--jobs", type=int, default=max(1, min(2, os.cpu_count() or 1)),
                             help="local: processes at a time (default: 2, or 1 on one core)")
            cmd.add_argument("--quiet", action="store_true", help="no progress bar")
            cmd.add_argument("--no-workers", dest="workers", action="store_false",
                             help="local: one fresh interpreter per step (default: single-"
                             "process steps run in long-lived workers that import torch and "
                             "megatron-core once)")
    report = sub.add_parser("report", help="tables and plots from an experiment's outputs")
    report.add_argument("out", help="the experiment's output directory")
    report.add_argument("--target-cost", type=float, help="pretraining device-hours at which "
                        "Table 8 compares methods (default: the middle of their common range)")
    report.add_argument("--alone-only", action="store_true", help="leave out the costs of runs "
                        "that shared the machine (another step at the same time, or a load "
                        "average above the cores): CPU-seconds rise beside other work")
    pick = sub.add_parser("pick-mix-expert", help="(a step of the runner) link the SLM-mix "
                          "expert of a spec set's most frequent cluster")
    pick.add_argument("--experts", required=True, help="SLM-mix checkpoint dir (expert_NNNN/)")
    pick.add_argument("--spec-data", required=True, help="`pn-data assign` output of the set")
    pick.add_argument("--output", required=True, help="directory: expert -> its checkpoint")
    return parser


def parse_args(argv: list[str] | None):
    """Overrides may also follow an option (`run CONFIG --out DIR key=value`): argparse leaves
    those over, and they join the others; anything else left over is an error."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and (not hasattr(args, "overrides")
                  or any(a.startswith("-") or "=" not in a for a in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides += extra
    return args


def output_dir(args, cfg) -> Path:
    return Path(args.out or Path("experiments_out") / cfg.name)


def pick_mix_expert(args) -> int:
    tokens = json.loads((Path(args.spec_data) / HISTOGRAM).read_text())["tokens"]
    expert = max(range(len(tokens)), key=tokens.__getitem__)
    source = Path(args.experts).resolve() / expert_dir(expert)
    if not source.is_dir():
        raise ConfigError(f"{source}: no SLM-mix expert {expert} (pretrain it first)")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    link = out / "expert"
    if link.is_symlink():
        link.unlink()
    link.symlink_to(source)
    atomic_write_json(out / "expert.json", {"expert": expert, "share": tokens[expert] /
                                            sum(tokens), "checkpoint": str(source)})
    print(f"SLM-mix expert {expert} ({tokens[expert] / sum(tokens):.0%} of the spec tokens)")
    return 0


def list_steps(grid) -> int:
    done = 0
    for step in grid.steps.values():
        finished = step.done.exists()
        done += finished
        print(f"{'done' if finished else '    '}  {step.kind:<8} {step.name}")
    print(f"{done} of {len(grid.steps)} steps done")
    return 0


def run(args) -> int:
    from megatron_pn.experiment.runner import LocalRunner, SlurmRunner, prepare_subsets

    cfg = load_experiment(args.config, args.overrides)
    out = output_dir(args, cfg)
    grid = build_grid(cfg, out)
    if args.command == "list":
        return list_steps(grid)
    out.mkdir(parents=True, exist_ok=True)
    prepare_subsets(grid)
    atomic_write_json(out / "experiment.json", {"config": args.config,
                                                 "overrides": args.overrides})
    if args.executor == "slurm":
        jobs = SlurmRunner(grid).run()
        print(f"submitted {len(jobs)} jobs (ids in {out / 'slurm_jobs.json'}); when they end: "
              f"pn-experiment report {out}")
        return 0
    LocalRunner(grid, args.jobs, args.quiet, args.workers).run()
    from megatron_pn.experiment.report import write_report

    write_report(out, cfg)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from megatron_pn.experiment.runner import StepFailed, Stopped

    try:
        return run_command("pn-experiment", lambda: command(args), (FileNotFoundError,))
    except StepFailed as err:  # the failed steps and their logs' tails: several lines
        print(f"pn-experiment: error: {err}", file=sys.stderr)
        return 1
    except Stopped as err:
        print(f"pn-experiment: stopped ({err}); the same command continues where it stopped",
              file=sys.stderr)
        return 130


def command(args) -> int:
    if args.command == "pick-mix-expert":
        return pick_mix_expert(args)
    if args.command == "report":
        from megatron_pn.experiment.report import report_main

        return report_main(Path(args.out), args.target_cost, args.alone_only)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
