"""`pn-data`: one subcommand per data step. Each step module exposes `register(subparsers)`,
which adds its parser and sets `func` (called with the parsed args, returns an exit code)."""

from __future__ import annotations

import argparse
import importlib
import sys

from pn_base.errors import ArgumentParser, run_command

# Order is the pipeline order shown in --help.
STEP_MODULES = [
    "data_tools.tokenizer",    # train-tokenizer
    "data_tools.preprocess",   # preprocess, merge
    "data_tools.embed",        # embed, merge-embeddings
    "data_tools.cluster",      # cluster, assign
    "data_tools.importance",   # importance
    "data_tools.stats",        # stats
]


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="pn-data",
        description="Data pipeline for megatron-pn: tokenizer, Megatron indexed datasets, "
        "Sentence-BERT embeddings, k-means clusters, importance sampling, cluster statistics.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in STEP_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:  # a real missing dependency, not a step not written yet
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # the data tools report bad input with the builtin exceptions
    return run_command(f"pn-data {args.command}", lambda: args.func(args),
                       (FileNotFoundError, FileExistsError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
