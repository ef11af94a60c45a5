"""Shared fixtures for the data-tool tests: real text, a small tokenizer trained on it with
`pn-data train-tokenizer`, and that text preprocessed into a Megatron indexed dataset.

Session-scoped (built once per test run, a few seconds); treat what they return as read-only.
"""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "data" / "corpus"
# Domains of the shipped corpus used here (a mix of prose, verse, reference and code-like text).
DOMAINS = ("bible", "fortunes", "manpages", "python_docs", "postgres_docs")
DOCS_PER_DOMAIN = 40
SMALL_VOCAB = 1000

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every tokenizer here is local
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no fork warnings from HF tokenizers


def _corpus_texts() -> list[str]:
    texts = []
    for domain in DOMAINS:
        path = CORPUS / domain / "train.jsonl.gz"
        if not path.is_file():
            continue
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for _, line in zip(range(DOCS_PER_DOMAIN), f):
                texts.append(json.loads(line)["text"])
    return texts


def _system_texts() -> list[str]:
    """Fallback when the corpus is absent: licence texts and kernel docs from Debian."""
    texts = [p.read_text(errors="replace") for p in sorted(Path("/usr/share/common-licenses").glob("*"))
             if p.is_file()]  # fmt: skip
    docs = sorted(Path("/usr/share/doc/linux-doc-6.1/Documentation").glob("*/*.rst.gz"))
    texts += [gzip.open(p, "rt", errors="replace").read() for p in docs[:150]]
    return [t for t in texts if t.strip()]


@pytest.fixture(scope="session")
def real_texts() -> list[str]:
    """A few hundred real documents (the shipped corpus, else Debian's text)."""
    texts = [t for t in _corpus_texts() or _system_texts() if t.strip()]
    if len(texts) < 50:
        pytest.skip("no real text found (data/corpus or /usr/share/doc)")
    return texts


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as f:
        for number, text in enumerate(texts):
            f.write(json.dumps({"id": number, field: text}) + "\n")
    return path


@pytest.fixture(scope="session")
def jsonl_writer():
    """`write(path, texts, field="text")`: one JSON object per text (gzip if path ends .gz)."""
    return write_jsonl


@dataclass(frozen=True)
class SmallTokenizer:
    model: Path  # SentencePiece .model
    hf_dir: Path  # Hugging Face tokenizer directory
    metadata: dict


@pytest.fixture(scope="session")
def small_tokenizer(tmp_path_factory, real_texts) -> SmallTokenizer:
    """A BPE tokenizer (vocab 1000) trained by `pn-data train-tokenizer` on `real_texts`."""
    from data_tools.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("tokenizer")
    corpus = write_jsonl(root / "train.jsonl.gz", real_texts)
    metadata = train_tokenizer([str(corpus)], str(root / "tok"), vocab_size=SMALL_VOCAB, threads=2)
    return SmallTokenizer(root / "tok.model", root / "tok_hf", metadata)


@dataclass(frozen=True)
class SmallDataset:
    prefix: Path  # PREFIX.bin / PREFIX.idx / PREFIX.json
    texts: list[str]  # the documents, in dataset order (none is empty)
    tokenizer: SmallTokenizer
    sidecar: dict


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory, real_texts, small_tokenizer) -> SmallDataset:
    """`real_texts` preprocessed by `pn-data preprocess` (2 workers) with `small_tokenizer`."""
    from data_tools.preprocess import run_preprocess

    root = tmp_path_factory.mktemp("dataset")
    corpus = write_jsonl(root / "docs.jsonl.gz", real_texts)
    prefix = root / "docs"
    result = run_preprocess([str(corpus)], str(small_tokenizer.model), str(prefix), workers=2,
                            quiet=True)  # fmt: skip
    sidecar = json.loads(Path(f"{prefix}.json").read_text())
    assert result["documents"] == sidecar["documents"] == len(real_texts)
    return SmallDataset(prefix, list(real_texts), small_tokenizer, sidecar)
