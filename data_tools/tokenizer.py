"""`pn-data train-tokenizer`: a SentencePiece tokenizer for the corpus, and its Hugging Face twin.

Ids fixed by this trainer (every tool relies on them):

    0 <unk>   1 <s> (BOS)   2 </s> (EOS)   3 <pad>
    4..259    the 256 byte pieces <0x00>..<0xFF> (byte fallback: no text ever maps to <unk>)
    260..     learned pieces

EOD = EOS (id 2): `pn-data preprocess` appends it after every document. BOS is defined for
downstream use but not added by the pipeline; PAD is never produced by encoding.

Like Llama's tokenizer: no normalization (identity), whitespace kept as is, a dummy-prefix space
at the start of a text, digits split into single pieces. Training sentences are the non-blank
lines of the sampled documents, so a newline encodes as the byte piece <0x0A>.

Sampling: a seeded reservoir sample of --sample-docs documents over all inputs (one pass over
them: for a huge corpus give a few files), from which SentencePiece draws up to
--input-sentence-size lines (shuffled).

Outputs: PREFIX.model and PREFIX.vocab (SentencePiece); PREFIX_hf/ (tokenizer.json +
tokenizer_config.json), which `transformers.AutoTokenizer.from_pretrained(PREFIX_hf)` loads offline
and which encodes to the same ids as PREFIX.model (checked on sampled documents at the end of
training; exact for BPE, for unigram ties between equal-score segmentations may differ); and
PREFIX.json with the settings, the sample, the special ids, sha256 and the check's result.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable, Iterator

from data_tools import readers
from data_tools.arguments import default_workers, positive_int
from pn_base.errors import UserError
from pn_base.fileio import atomic_path, atomic_write_json, check_writable, file_sha256
from pn_base.tokenizer_identity import HF_RECORD


def load_sentencepiece(path: str | Path, key: str = "--tokenizer-model"):
    """A SentencePiece processor, or one clear error naming the file and the key it came from.
    Loaded once per file version (a run's start-up asks for it from several checks)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{key} {path}: not found (the .model of `pn-data train-tokenizer`)")
    stat = path.stat()
    try:
        return _load_sentencepiece(str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    except RuntimeError as err:
        raise UserError(f"{key} {path}: not a SentencePiece model ({err}) — give the .model "
                        "that `pn-data train-tokenizer` wrote") from None


@functools.lru_cache(maxsize=8)
def _load_sentencepiece(path: str, mtime_ns: int, size: int):  # the file's version is the key
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=path)


SPECIAL_IDS = {"unk": 0, "bos": 1, "eos": 2, "pad": 3}
EOD_ID = SPECIAL_IDS["eos"]
HF_CHECK_DOCS = 200
HF_CHECK_CHARS = 20_000  # per document: the HF BPE is slow on very long texts


def reservoir_sample(texts: Iterable[str], size: int, seed: int) -> tuple[list[str], int]:
    """A uniform sample of `size` texts (all if fewer) in one pass; returns (sample, seen)."""
    rng = random.Random(seed)
    sample: list[str] = []
    seen = 0
    for seen, text in enumerate(texts, start=1):
        if len(sample) < size:
            sample.append(text)
        else:
            slot = rng.randrange(seen)
            if slot < size:
                sample[slot] = text
    return sample, seen


def training_lines(documents: list[str]) -> Iterator[str]:
    for document in documents:
        for line in document.split("\n"):
            if line.strip():
                yield line


def train_sentencepiece(documents: list[str], model_prefix: str, vocab_size: int,
                        model_type: str, input_sentence_size: int, threads: int,
                        verbose: bool = False) -> None:  # fmt: skip
    """Train into model_prefix.model/.vocab with the ids and normalization documented above."""
    import sentencepiece

    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=training_lines(documents),
            model_prefix=model_prefix,
            vocab_size=vocab_size,
            model_type=model_type,
            byte_fallback=True,
            unk_id=SPECIAL_IDS["unk"], bos_id=SPECIAL_IDS["bos"],
            eos_id=SPECIAL_IDS["eos"], pad_id=SPECIAL_IDS["pad"],
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=True,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            max_sentence_length=16384,
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True,
            num_threads=threads,
            minloglevel=0 if verbose else 2,
        )  # fmt: skip
    except RuntimeError as err:  # e.g. "Vocabulary size too high" for a small sample
        raise ValueError(f"SentencePiece training failed: {err}") from None


def export_hf_tokenizer(model_path: str | Path, output_dir: str | Path) -> None:
    """Write a Hugging Face tokenizer directory equivalent to the SentencePiece model.

    The vocabulary (and BPE merges) come from the model; the pre-processing reproduces what
    SentencePiece does with this trainer's settings: always prepend the dummy-prefix "▁",
    replace spaces by "▁", no other normalization, byte fallback. Special tokens in the text
    are encoded as plain text (split_special_tokens), as SentencePiece does, and nothing is
    added around a text (no BOS/EOS), so `tok(text).input_ids == sp.encode(text)`.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SentencePieceExtractor

    extractor = SentencePieceExtractor(str(model_path))
    spec = extractor.proto.trainer_spec
    if spec.model_type == 2:  # BPE in sentencepiece_model.proto
        extracted = extractor.extract(models.BPE)
        model = models.BPE(vocab=extracted["vocab"], merges=extracted["merges"],
                           unk_token=spec.unk_piece, fuse_unk=True, byte_fallback=True)  # fmt: skip
    else:
        extracted = extractor.extract(models.Unigram)
        model = models.Unigram(vocab=extracted["vocab"], unk_id=spec.unk_id, byte_fallback=True)
    backend = Tokenizer(model)
    backend.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
         decoders.Strip(" ", 1, 0)]  # drop the dummy prefix again
    )  # fmt: skip
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=spec.unk_piece, bos_token=spec.bos_piece,
        eos_token=spec.eos_piece, pad_token=spec.pad_piece,
        split_special_tokens=True, clean_up_tokenization_spaces=False,
    )  # fmt: skip
    tokenizer.save_pretrained(str(output_dir))


def check_hf_tokenizer(model_path, hf_dir, texts: list[str]) -> dict:
    """Encode `texts` with both tokenizers; returns how many give identical ids."""
    import sentencepiece
    from transformers import AutoTokenizer

    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_path))
    hf = AutoTokenizer.from_pretrained(str(hf_dir))
    texts = [text[:HF_CHECK_CHARS] for text in texts]
    hf_ids = hf(texts)["input_ids"]
    matching = sum(a == b for a, b in zip(sp.encode(texts), hf_ids))
    return {"documents": len(texts), "identical": matching}


def train_tokenizer(inputs: list[str], output_prefix: str, *, vocab_size: int = 32000,
                    model_type: str = "bpe", sample_docs: int = 100_000,
                    input_sentence_size: int = 2_000_000, text_field: str = "text",
                    skip_bad: bool = False, seed: int = 0, threads: int = 1,
                    overwrite: bool = False, verbose: bool = False) -> dict:  # fmt: skip
    """Sample, train, export to Hugging Face and check; returns the metadata written to
    OUTPUT_PREFIX.json."""
    paths = {suffix: Path(output_prefix + suffix) for suffix in (".model", ".vocab", "_hf", ".json")}
    for path in paths.values():
        check_writable(path, overwrite)
    stats = readers.ReadStats()
    texts = readers.iter_texts(inputs, text_field, skip_bad=skip_bad, stats=stats)
    sample, seen = reservoir_sample(texts, sample_docs, seed)
    if not sample:
        raise ValueError("the inputs hold no document to train a tokenizer on")
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        tmp = {key: stack.enter_context(atomic_path(path, overwrite))
               for key, path in paths.items() if key != ".json"}  # fmt: skip
        with tempfile.TemporaryDirectory(dir=paths[".model"].parent) as work:
            train_sentencepiece(sample, f"{work}/sp", vocab_size, model_type,
                                input_sentence_size, threads, verbose)  # fmt: skip
            shutil.move(f"{work}/sp.model", tmp[".model"])
            shutil.move(f"{work}/sp.vocab", tmp[".vocab"])
        export_hf_tokenizer(tmp[".model"], tmp["_hf"])
        # the .model's fingerprint travels with the HF copy (pn-export-hf compares it)
        atomic_write_json(tmp["_hf"] / HF_RECORD, {"model": str(paths[".model"].resolve()),
                                                   "sha256": file_sha256(tmp[".model"])})
        check_sample = random.Random(seed).sample(sample, min(HF_CHECK_DOCS, len(sample)))
        check = check_hf_tokenizer(tmp[".model"], tmp["_hf"], check_sample)
        _judge_hf_check(check, model_type)
    metadata = {
        "command": "pn-data train-tokenizer",
        "model": str(paths[".model"].resolve()),
        "sha256": file_sha256(paths[".model"]),
        "hf_dir": str(paths["_hf"].resolve()),
        "model_type": model_type,
        "vocab_size": vocab_size,
        "special_ids": SPECIAL_IDS,
        "eod_id": EOD_ID,
        "byte_fallback": True,
        "inputs": [str(Path(p).resolve()) for p in inputs],
        "text_field": text_field,
        "read": stats.as_dict(),
        "sample": {"documents": len(sample), "of_documents": seen, "seed": seed,
                   "input_sentence_size": input_sentence_size},  # fmt: skip
        "hf_check": check,
        "training_seconds": round(time.perf_counter() - started, 1),
    }
    atomic_write_json(paths[".json"], metadata, overwrite)
    return metadata


def _judge_hf_check(check: dict, model_type: str) -> None:
    if check["identical"] == check["documents"]:
        return
    message = (
        f"the Hugging Face tokenizer differs from SentencePiece on "
        f"{check['documents'] - check['identical']} of {check['documents']} sampled documents"
    )
    if model_type == "bpe":  # exact by construction: a difference is a bug, do not ship it
        raise RuntimeError(message)
    print(f"warning: {message} (unigram: ties between equal-score segmentations)", file=sys.stderr)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train-tokenizer",
        help="train a SentencePiece tokenizer (+ Hugging Face copy) on a sample of the corpus",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help=readers.INPUTS_HELP)
    p.add_argument("--output", required=True, metavar="PREFIX",
                   help="writes PREFIX.model, PREFIX.vocab, PREFIX_hf/ and PREFIX.json")
    p.add_argument("--vocab-size", type=positive_int, default=32000, metavar="N",
                   help="vocabulary size, special and byte pieces included (default: 32000)")
    p.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe",
                   help="SentencePiece algorithm (default: bpe, whose Hugging Face copy is exact)")
    p.add_argument("--sample-docs", type=positive_int, default=100_000, metavar="N",
                   help="documents sampled (uniformly, seeded) from the inputs (default: 100000)")
    p.add_argument("--input-sentence-size", type=positive_int, default=2_000_000, metavar="N",
                   help="lines of the sample SentencePiece trains on, drawn at random "
                   "(default: 2000000)")
    p.add_argument("--text-field", default="text", metavar="NAME",
                   help="JSON field / Parquet column holding the document text (default: text)")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip and count malformed records instead of stopping at the first one")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--threads", type=positive_int, default=default_workers(), metavar="N",
                   help="SentencePiece training threads (default: the CPUs available)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--verbose", action="store_true", help="show SentencePiece's training log")
    p.set_defaults(func=_command)


def _command(args) -> int:
    metadata = train_tokenizer(
        args.input, args.output, vocab_size=args.vocab_size, model_type=args.model_type,
        sample_docs=args.sample_docs, input_sentence_size=args.input_sentence_size,
        text_field=args.text_field, skip_bad=args.skip_bad, seed=args.seed,
        threads=args.threads, overwrite=args.overwrite, verbose=args.verbose,
    )  # fmt: skip
    check = metadata["hf_check"]
    print(
        f"{args.output}.model: {metadata['model_type']} vocab {metadata['vocab_size']} from "
        f"{metadata['sample']['documents']:,} of {metadata['sample']['of_documents']:,} documents "
        f"in {metadata['training_seconds']}s; EOD/EOS id {EOD_ID}; {args.output}_hf/ gives "
        f"identical ids on {check['identical']}/{check['documents']} sampled documents"
    )
    return 0
