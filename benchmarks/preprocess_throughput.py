"""Tokens/s of `pn-data preprocess` against Megatron-LM's tools/preprocess_data.py and against the
raw SentencePiece encode rate, with the same input, tokenizer and worker count.

    python benchmarks/preprocess_throughput.py [--input DOCS ...] [--tokenizer-model M]
        [--workers N] [--megatron-lm PATH/TO/Megatron-LM] [--repeats 3] [--copies 1]

* raw: the texts already in memory, N forked processes each encoding its share with
  `sp.encode(list)` (one thread each); no reading, decoding or writing. The upper bound.
* pn-data: `python -m data_tools preprocess` as a user runs it. "End to end" is its wall time
  (interpreter start, imports and the final .bin/.idx included); "steady" is the rate it reports
  for its tokenizing loop.
* Megatron-LM: `tools/preprocess_data.py --tokenizer-type GPTSentencePieceTokenizer
  --append-eod` from the checkout given with --megatron-lm (its Python dependencies must be
  importable; the checkout is put first on PYTHONPATH). Without it that comparison is skipped.
  Both outputs are compared byte for byte (equal when no document is empty).

Also measured, because wall time on a shared machine depends on what else runs: the CPU seconds
of each tool (all its processes), as tokens per CPU-second, both end to end and without start-up
(a run on the input minus a run on its first document, so interpreter start, imports and pool
start cancel). Both tools keep every core busy, so on an idle machine their wall-time ratio is
their CPU ratio; "% of raw" compares CPU per token with SentencePiece's own.

Runs are interleaved and repeated (medians reported). Without --input, the shipped corpus
(data/corpus/*/*.jsonl.gz, all splits) is used, --copies times over; without --tokenizer-model,
a 32k BPE is trained on it with `pn-data train-tokenizer`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_texts: list[str] = []  # shared with the raw-rate workers by fork

def build_input(inputs: list[str], copies: int, out: Path) -> Path:
    """One plain JSONL file (what Megatron-LM's tool reads) with the documents of `inputs`."""
    sys.path.insert(0, str(REPO))
    from data_tools import readers

    sources = inputs or sorted(str(p) for p in (REPO / "data" / "corpus").glob("*/*.jsonl.gz"))
    if not sources:
        raise SystemExit("no --input given and no data/corpus/*/*.jsonl.gz to default to")
    texts = list(readers.iter_texts(sources, skip_bad=True))
    with open(out, "w", encoding="utf-8") as f:
        for _ in range(copies):
            for text in texts:
                f.write(json.dumps({"text": text}) + "\n")
    return out


def load_texts(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


# --------------------------------------------------------------------------------------------
# Raw SentencePiece


def _init_raw(model: str) -> None:
    import sentencepiece

    global _sp
    _sp = sentencepiece.SentencePieceProcessor(model_file=model)


def _encode_share(bounds: tuple[int, int]) -> tuple[int, float]:
    started = time.process_time()
    ids = _sp.encode(_texts[bounds[0] : bounds[1]], add_eos=True, num_threads=1)
    return sum(map(len, ids)), time.process_time() - started


def raw_rate(model: str, texts: list[str], workers: int) -> dict:
    """SentencePiece alone with `workers` processes on in-memory texts."""
    import multiprocessing

    _texts[:] = texts
    shares, start, size = [], 0, 0
    for end, text in enumerate(texts, start=1):  # ~256 KB of text per task, like pn-data
        size += len(text)
        if size >= 1 << 18 or end == len(texts):
            shares.append((start, end))
            start, size = end, 0
    with multiprocessing.get_context("fork").Pool(workers, _init_raw, (model,)) as pool:
        pool.map(_encode_share, shares[:workers])  # warm up: processes started, model loaded
        started = time.perf_counter()
        results = list(pool.imap_unordered(_encode_share, shares))
        wall = time.perf_counter() - started
    tokens = sum(t for t, _ in results)
    return {"tokens": tokens, "wall": wall, "cpu": sum(c for _, c in results)}


# --------------------------------------------------------------------------------------------
# The two tools, run as subprocesses


def timed(command: list[str], cwd: Path, env: dict | None = None) -> dict:
    """Wall seconds and CPU seconds of all its processes (workers included) of one run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    result = subprocess.run([sys.executable, *command], cwd=cwd, env=env, capture_output=True,
                            text=True)  # fmt: skip
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command[:3])} failed:\n{result.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall": wall, "cpu": cpu, "stdout": result.stdout}


def run_ours(data: Path, model: str, workers: int, prefix: Path) -> dict:
    for suffix in (".bin", ".idx", ".json"):
        Path(f"{prefix}{suffix}").unlink(missing_ok=True)
    command = ["-m", "data_tools", "preprocess", "--input", str(data), "--tokenizer-model", model,
               "--output-prefix", str(prefix), "--workers", str(workers), "--quiet"]  # fmt: skip
    run = timed(command, REPO)
    steady = re.search(r"\(([\d,]+) tok/s\)", run["stdout"]).group(1)
    run["steady"] = float(steady.replace(",", ""))
    return run


def run_megatron(megatron_lm: Path, data: Path, model: str, workers: int, prefix: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(megatron_lm), env.get("PYTHONPATH")]))
    command = [str(megatron_lm / "tools" / "preprocess_data.py"), "--input", str(data),
               "--output-prefix", str(prefix), "--tokenizer-type", "GPTSentencePieceTokenizer",
               "--tokenizer-model", model, "--workers", str(workers), "--append-eod",
               "--log-interval", "1000000"]  # fmt: skip
    return timed(command, megatron_lm, env)


def same_files(prefix_a: str, prefix_b: str) -> bool:
    return all(Path(prefix_a + s).read_bytes() == Path(prefix_b + s).read_bytes()
               for s in (".bin", ".idx"))  # fmt: skip


def train_default_tokenizer(data: Path, out: Path) -> str:
    subprocess.run([sys.executable, "-m", "data_tools", "train-tokenizer", "--input", str(data),
                    "--output", str(out / "bench_tok"), "--vocab-size", "32000",
                    "--sample-docs", "20000"], cwd=REPO, check=True)  # fmt: skip
    return str(out / "bench_tok.model")


# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", nargs="*", default=[], help="documents (any pn-data format)")
    parser.add_argument("--tokenizer-model", help="SentencePiece model (default: train a 32k BPE)")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--megatron-lm", type=Path, help="a Megatron-LM checkout")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs of each (median)")
    parser.add_argument("--copies", type=int, default=1, help="repeat the input this many times")
    parser.add_argument("--workdir", type=Path, help="keep inputs and outputs here (default: temp)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        data = build_input(args.input, args.copies, work / "bench.jsonl")
        tiny = work / "tiny.jsonl"
        tiny.write_text(data.open().readline())
        model = args.tokenizer_model or train_default_tokenizer(data, work)
        texts = load_texts(data)
        if args.megatron_lm is None:
            print("Megatron-LM comparison skipped: pass --megatron-lm PATH/TO/Megatron-LM")
        tools = {"pn-data": lambda d, p: run_ours(d, model, args.workers, p)}
        if args.megatron_lm:
            tools["Megatron-LM"] = lambda d, p: run_megatron(args.megatron_lm, d, model,
                                                             args.workers, p)  # fmt: skip
        runs = {"raw": [], **{name: [] for name in tools}}
        for repeat in range(args.repeats):
            runs["raw"].append(raw_rate(model, texts, args.workers))
            for name, run in tools.items():
                full = run(data, work / name)
                full["cpu_tiny"] = run(tiny, work / f"{name}-tiny")["cpu"]
                runs[name].append(full)
            print(f"run {repeat + 1}: " + ", ".join(
                f"{name} {runs['raw'][-1]['tokens'] / r[-1]['wall']:,.0f} tok/s "
                f"({runs['raw'][-1]['tokens'] / r[-1]['cpu']:,.0f}/CPU-s)"
                for name, r in runs.items()), f"load {os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip
        report(runs, len(texts), data, args.workers)
        if args.megatron_lm:
            identical = same_files(str(work / "pn-data"), str(work / "Megatron-LM_text_document"))
            print(f"outputs byte-identical (.bin and .idx): {'yes' if identical else 'NO'}")
    return 0


def report(runs: dict, documents: int, data: Path, workers: int) -> None:
    tokens = runs["raw"][0]["tokens"]

    def med(name, key):
        return statistics.median(r[key] for r in runs[name])

    raw_cpu = tokens / med("raw", "cpu")
    print(f"\ninput: {documents:,} documents, {data.stat().st_size / 1e6:,.1f} MB JSONL, "
          f"{tokens:,} tokens (EOD included); {workers} workers; median of {len(runs['raw'])} "
          f"runs; load average {os.getloadavg()[1]:.1f} (5 min)")  # fmt: skip
    print(f"{'tok/s':>49}{'tok/CPU-s':>12}{'tok/CPU-s':>13}{'% of raw':>10}{'start-up':>10}")
    print(f"{'wall':>49}{'all':>12}{'no start-up':>13}{'(CPU)':>10}{'CPU s':>10}")
    print(f"{'raw SentencePiece (texts in memory)':38}{tokens / med('raw', 'wall'):>11,.0f}"
          f"{'':>12}{raw_cpu:>13,.0f}{'100%':>10}")  # fmt: skip
    steady = {}
    for name in runs:
        if name == "raw":
            continue
        startup = med(name, "cpu_tiny")
        steady[name] = tokens / statistics.median(r["cpu"] - r["cpu_tiny"] for r in runs[name])
        print(f"{name + ' preprocess, end to end':38}{tokens / med(name, 'wall'):>11,.0f}"
              f"{tokens / med(name, 'cpu'):>12,.0f}{steady[name]:>13,.0f}"
              f"{steady[name] / raw_cpu:>10.0%}{startup:>10.1f}")  # fmt: skip
    print(f"pn-data steady rate it reports (wall, tokenizing loop): {med('pn-data', 'steady'):,.0f} "
          f"tok/s = {med('pn-data', 'steady') * med('raw', 'wall') / tokens:.0%} of raw wall")
    if "Megatron-LM" in runs:
        print(f"pn-data / Megatron-LM: wall {med('Megatron-LM', 'wall') / med('pn-data', 'wall'):.2f}x"
              f", CPU end to end {med('Megatron-LM', 'cpu') / med('pn-data', 'cpu'):.2f}x, "
              f"CPU without start-up {steady['pn-data'] / steady['Megatron-LM']:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
