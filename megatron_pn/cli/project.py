"""`pn-project` (megatron_pn/specialize.py has the strategies and the projection)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data_tools.arguments import positive_int
from megatron_pn import specialize
from megatron_pn.config import VALID_TOKENS
from megatron_pn.specialize import CLUSTERING_FLAG, STRATEGIES
from pn_base.errors import ArgumentParser, run_command


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="pn-project", description=specialize.__doc__.split("\n\n")[0],
        epilog=specialize.__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a PN checkpoint (root or iter dir)")
    spec = parser.add_mutually_exclusive_group(required=True)
    spec.add_argument("--spec-data", type=Path,
                      help="`pn-data assign` output directory of the specialization set")
    spec.add_argument("--histogram", type=Path, metavar="FILE",
                      help="the specialization set's cluster histogram alone (a histogram.json "
                      "of `pn-data assign`): no text, no training data needed")
    parser.add_argument("--strategy", default="most-frequent",
                        help=f"one of {', '.join(STRATEGIES)} (default: most-frequent)")
    parser.add_argument("--output", required=True, type=Path, help="dense checkpoint directory")
    parser.add_argument("--sample-tokens", type=positive_int, default=VALID_TOKENS,
                        help="best-loss: spec tokens each expert is scored on (default "
                        f"{VALID_TOKENS}, as train.valid_tokens)")
    parser.add_argument("--allow-tokenizer-mismatch", action="store_true",
                        help="project although the specialization set records another "
                        "tokenizer than the checkpoint was trained with")
    parser.add_argument(CLUSTERING_FLAG, action="store_true",
                        help="project although the histogram records another clustering than "
                        "the checkpoint was trained on, or none")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command("pn-project", lambda: _project_main(args))


def _project_main(args) -> int:
    record = specialize.project(args)
    chosen = record["expert"] if record["expert"] is not None else "histogram mixture"
    print(f"projected expert {chosen} ({record['strategy']}) of {record['source']} -> "
          f"{args.output} in {record['seconds']:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
