"""`pn-export-hf` and `pn-import-hf` (megatron_pn/hf.py has the conversions)."""

from __future__ import annotations

import argparse
import sys

from megatron_pn.hf import export, import_hf
from pn_base.errors import ArgumentParser, run_command


def export_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="pn-export-hf",
        description="Export a dense checkpoint (SLM, LLM, SLM-mix expert, projected expert, a "
        "LoRA fine-tuning: merged, or --adapter) or "
        "one expert of a PN checkpoint, saved at any TP/PP layout, as a Hugging Face model "
        "directory: LlamaForCausalLM (SwiGLU/RMSNorm/RoPE) or GPT2LMHeadModel "
        "(GELU/LayerNorm/learned positions), safetensors.",
        epilog="example: pn-export-hf --checkpoint runs/pn/ckpt --expert 3 --output hf/e3 "
        "--tokenizer tok/spm_hf", formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint directory (its best iteration if it keeps one, else its "
                        "latest) or one iter_NNNNNNN")
    parser.add_argument("--output", required=True, help="Hugging Face model directory to write")
    parser.add_argument("--expert", type=int, help="PN checkpoints: the expert to export")
    parser.add_argument("--tokenizer", help="Hugging Face tokenizer dir to copy in (PREFIX_hf/ "
                        "of `pn-data train-tokenizer`)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                        help="dtype of the saved weights")
    parser.add_argument("--allow-tokenizer-mismatch", action="store_true",
                        help="copy in --tokenizer although it is not the tokenizer the "
                        "checkpoint was trained with")
    parser.add_argument("--adapter", action="store_true",
                        help="LoRA checkpoints (finetune.lora): write the frozen base to --output "
                        "and the adapters as a peft adapter directory in OUTPUT/adapter "
                        "(PeftModel.from_pretrained(base, OUTPUT/adapter)); without it, the "
                        "adapters are merged into the exported weights")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    return parser


def import_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="pn-import-hf",
        description="Import a Hugging Face Llama or GPT-2 model as a megatron-pn checkpoint "
        "(model weights, iteration 0) to initialize training from.",
        epilog="example: pn-import-hf --hf hf/slm --output ckpt/slm --config "
        "configs/paper/slm.yaml\nthen:    pn-train configs/paper/slm.yaml ckpt/slm/model.yaml "
        "checkpoint.load=ckpt/slm",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf", required=True, help="Hugging Face model directory")
    parser.add_argument("--output", required=True, help="checkpoint directory to write")
    parser.add_argument("--config", action="append", default=[], metavar="CONFIG.yaml",
                        help="run config to store (its model section is replaced by the HF "
                        "model's shapes); repeat to stack files")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    return parser


def export_main(argv: list[str] | None = None) -> int:
    args = export_parser().parse_args(argv)
    return run_command("pn-export-hf", lambda: print("wrote " + str(export(
        args.checkpoint, args.output, args.expert, args.tokenizer, args.dtype, args.overwrite,
        args.allow_tokenizer_mismatch, args.adapter)), flush=True))


def import_main(argv: list[str] | None = None) -> int:
    args = import_parser().parse_args(argv)
    return run_command("pn-import-hf", lambda: print("wrote " + str(import_hf(
        args.hf, args.output, args.config, args.overwrite)), flush=True))


if __name__ == "__main__":
    sys.exit(export_main())
