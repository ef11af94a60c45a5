"""`pn-merge-lora` (megatron_pn/lora.py has the adapters, checkpoint_tools.py the merge)."""

from __future__ import annotations

import argparse
import sys

from pn_base.errors import ArgumentParser, run_command


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="pn-merge-lora",
        description="Merge the LoRA adapters of a fine-tuning run (finetune.lora) into its frozen "
        "base: a plain dense checkpoint whose weights are W + (alpha / r) B A, which every tool "
        "reads (pn-eval, pn-export-hf, checkpoint.load). The adapter checkpoint names its base "
        "(path and sha256), which must still be there unchanged.",
        epilog="example: pn-merge-lora --checkpoint runs/spec/lora/ckpt --output runs/spec/merged",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True,
                        help="adapter checkpoint directory (its best iteration if it keeps one, "
                        "else its latest) or one iter_NNNNNNN")
    parser.add_argument("--output", required=True, help="dense checkpoint directory to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def merge() -> None:
        from megatron_pn.checkpoint_tools import merge_adapters

        print(f"wrote {merge_adapters(args.checkpoint, args.output, args.overwrite)}", flush=True)

    return run_command("pn-merge-lora", merge)


if __name__ == "__main__":
    sys.exit(main())
