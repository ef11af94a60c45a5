"""`pn-eval` (megatron_pn/evaluate.py has the windows and the metric)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megatron_pn.evaluate import evaluate, markdown_table
from megatron_pn.checkpoint_tools import ToolError, inference_world
from pn_base.errors import ArgumentParser, UserError, one_line, run_command
from pn_base.fileio import atomic_write_json, check_writable

EPILOG = """examples:
  pn-eval --checkpoint runs/slm/ckpt --data data/held/arxiv,data/held/wiki --names arxiv,wiki
  pn-eval --checkpoint runs/pn/ckpt --data data/held/arxiv --expert 3 --output e3.json
  pn-eval --checkpoint runs/pn/ckpt --data data/held/arxiv --cluster-ids-from assign/arxiv
  torchrun --nproc-per-node 2 -m megatron_pn.cli.evaluate --checkpoint CKPT --data PREFIX

Runs on the GPU when one is visible (CUDA_VISIBLE_DEVICES= forces the CPU)."""


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="pn-eval",
        description="Token-level NLL and perplexity of a checkpoint on held-out indexed datasets "
        "(every token predicted once, EOD included, in non-overlapping windows of the model's "
        "context) and their macro-average: mean NLL over datasets, then exp.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint",
                        help="checkpoint directory (its best iteration if it keeps one, else its "
                        "latest) or one iter_NNNNNNN")
    parser.add_argument("--data",
                        help="comma-separated indexed dataset prefixes (PREFIX.bin/.idx)")
    parser.add_argument("--batch", metavar="JOBS.json",
                        help="run many evaluations in this one process: a JSON list of objects "
                        "whose keys are this command's options (checkpoint, data, output "
                        "required; e.g. expert, max_tokens); those whose output exists are "
                        "skipped")
    parser.add_argument("--names", help="comma-separated names, one per prefix (default: the "
                        "prefixes' file names)")
    route = parser.add_mutually_exclusive_group()
    route.add_argument("--expert", type=int, help="PN checkpoints: compute every sequence "
                       "with this expert")
    route.add_argument("--cluster-ids-from", metavar="ASSIGN_DIR[,...]", help="PN checkpoints: "
                       "compute each window with its cluster's expert, from `pn-data assign` "
                       "output on each set (one directory per prefix)")
    parser.add_argument("--only-cluster", type=int, metavar="I", help="with "
                        "--cluster-ids-from: evaluate only the windows of cluster I (a PN model "
                        "computes them with expert I; e.g. an SLM-mix expert on its cluster)")
    parser.add_argument("--max-tokens", type=int, help="evaluate at most this many tokens of "
                        "each set (its first documents)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="compute precision (bf16 needs a GPU)")
    parser.add_argument("--eod-id", type=int, help="end-of-document id (default: the model's "
                        "tokenizer EOS, else its data.eod_id)")
    parser.add_argument("--allow-tokenizer-mismatch", action="store_true",
                        help="evaluate although a dataset's PREFIX.json records another "
                        "tokenizer than the checkpoint was trained with")
    parser.add_argument("--output", help="write the results as JSON to this file")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def check_arguments(args) -> None:
    if args.batch is None and not (args.checkpoint and args.data):
        raise ToolError("give --checkpoint and --data (or --batch JOBS.json)")
    if args.only_cluster is not None and not args.cluster_ids_from:
        raise ToolError("--only-cluster needs --cluster-ids-from")
    if args.batch_size < 1:
        raise ToolError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise ToolError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.output:
        check_writable(args.output, args.overwrite)


def batch_jobs(parser: argparse.ArgumentParser, path: str) -> list[argparse.Namespace]:
    """The evaluations of a --batch file, as this command's arguments, checked up front."""
    try:
        jobs = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ToolError(f"--batch {path}: {err}") from err
    if not isinstance(jobs, list):
        raise ToolError(f"--batch {path}: expected a JSON list of evaluations")
    known = vars(parser.parse_args([]))
    parsed = []
    for i, job in enumerate(jobs):
        unknown = set(job) - set(known) if isinstance(job, dict) else {"(not an object)"}
        if unknown or not all(job.get(k) for k in ("checkpoint", "data", "output")):
            raise ToolError(f"--batch {path}: entry {i} needs checkpoint, data and output and "
                            f"only pn-eval options (unknown: {sorted(unknown)})")
        args = argparse.Namespace(**{**known, **job, "quiet": True, "batch": None})
        # an existing output is skipped (run_batch), not an error
        check_arguments(argparse.Namespace(**{**vars(args), "overwrite": True}))
        parsed.append(args)
    return parsed


def run_batch(jobs: list[argparse.Namespace], env) -> int:
    """Evaluate each job whose output does not exist yet (a re-run continues); a job with bad
    input is reported and skipped. Returns the number of failed jobs."""
    failed = 0
    for args in jobs:
        if Path(args.output).exists() and not args.overwrite:
            continue
        try:
            report = evaluate(args, env)
        except UserError as err:
            failed += 1
            if env.rank == 0:
                print(f"pn-eval: error: {args.output}: {one_line(err)}", file=sys.stderr,
                      flush=True)
            continue
        if env.rank == 0:
            atomic_write_json(args.output, report, overwrite=True)
            print(f"{args.output}: " + ", ".join(
                f"{r['name']} ppl {r['ppl'] or float('nan'):.2f} ({r['tokens']} tokens)"
                for r in report["datasets"]), flush=True)
    return failed


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_command("pn-eval", lambda: _evaluate_main(parser, args))


def _evaluate_main(parser, args) -> int:
    check_arguments(args)
    if args.batch:
        jobs = batch_jobs(parser, args.batch)
        with inference_world() as env:
            return 2 if run_batch(jobs, env) else 0
    with inference_world() as env:
        report = evaluate(args, env)
    if env.rank == 0:
        if args.output:
            atomic_write_json(args.output, report, overwrite=True)
        print(markdown_table(report["datasets"], report["macro_average"]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
