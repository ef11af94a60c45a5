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

Also measured, because wall time on a shared machine is noisy: the CPU seconds of each tool (all
its processes), and the CPU seconds of its *main process* spent per token (a run on the input
minus a run on one document, so start-up and imports cancel). The main process is the serial
part of both pipelines: with many workers it bounds the throughput at 1 / (its CPU per token).

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

# Runs a module or script as __main__ and records the CPU time of this (main) process at exit.
_MAIN_CPU_WRAPPER = """
import atexit, json, os, resource, runpy, sys
def _record():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    with open(os.environ["BENCH_MAIN_CPU_FILE"], "w") as f:
        json.dump(usage.ru_utime + usage.ru_stime, f)
atexit.register(_record)
kind, target, *arguments = sys.argv[1:]
sys.argv = [target, *arguments]
runpy.run_module(target, run_name="__main__", alter_sys=True) if kind == "-m" else \\
    runpy.run_path(target, run_name="__main__")
"""


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
    """Wall seconds, CPU seconds of all its processes, CPU seconds of its main process."""
    env = dict(env or os.environ)
    with tempfile.NamedTemporaryFile(suffix=".json") as main_cpu:
        env["BENCH_MAIN_CPU_FILE"] = main_cpu.name
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        result = subprocess.run([sys.executable, "-c", _MAIN_CPU_WRAPPER, *command], cwd=cwd,
                                env=env, capture_output=True, text=True)  # fmt: skip
        wall = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if result.returncode != 0:
            raise SystemExit(f"{' '.join(command[:2])} failed:\n{result.stderr[-3000:]}")
        main = json.loads(Path(main_cpu.name).read_text())
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall": wall, "cpu": cpu, "main_cpu": main, "stdout": result.stdout}


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
    return timed(["-p", *command], megatron_lm, env)


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
                full["main_cpu_tiny"] = run(tiny, work / f"{name}-tiny")["main_cpu"]
                runs[name].append(full)
            print(f"run {repeat + 1}: " + ", ".join(
                f"{name} {runs['raw'][-1]['tokens'] / r[-1]['wall']:,.0f} tok/s"
                for name, r in runs.items()), f"(load {os.getloadavg()[0]:.1f})", flush=True)  # fmt: skip
        report(runs, len(texts), data, args.workers)
        if args.megatron_lm:
            identical = same_files(str(work / "pn-data"), str(work / "Megatron-LM_text_document"))
            print(f"outputs byte-identical (.bin and .idx): {'yes' if identical else 'NO'}")
    return 0


def report(runs: dict, documents: int, data: Path, workers: int) -> None:
    tokens = runs["raw"][0]["tokens"]

    def med(name, key):
        return statistics.median(r[key] for r in runs[name])

    raw_wall, raw_cpu = tokens / med("raw", "wall"), tokens / med("raw", "cpu")
    print(f"\ninput: {documents:,} documents, {data.stat().st_size / 1e6:,.1f} MB JSONL, "
          f"{tokens:,} tokens (EOD included); {workers} workers; median of {len(runs['raw'])} "
          "runs")  # fmt: skip
    print(f"{'':32}{'wall tok/s':>12}{'% raw':>7}{'tok/CPU-s':>11}{'main CPU s/1M tok':>19}")
    print(f"{'raw SentencePiece (in memory)':32}{raw_wall:>12,.0f}{'100%':>7}{raw_cpu:>11,.0f}")
    for name in runs:
        if name == "raw":
            continue
        wall = tokens / med(name, "wall")
        serial = statistics.median(r["main_cpu"] - r["main_cpu_tiny"] for r in runs[name])
        print(f"{name + ', end to end':32}{wall:>12,.0f}{wall / raw_wall:>7.0%}"
              f"{tokens / med(name, 'cpu'):>11,.0f}{serial / tokens * 1e6:>19.3f}")  # fmt: skip
        if name == "pn-data":
            steady = med(name, "steady")
            print(f"{'pn-data, steady (tokenizing)':32}{steady:>12,.0f}{steady / raw_wall:>7.0%}")
    if "Megatron-LM" in runs:
        ratio = med("Megatron-LM", "wall") / med("pn-data", "wall")
        print(f"pn-data / Megatron-LM, end to end wall: {ratio:.2f}x; CPU: "
              f"{med('Megatron-LM', 'cpu') / med('pn-data', 'cpu'):.2f}x")


if __name__ == "__main__":
    sys.exit(main())
