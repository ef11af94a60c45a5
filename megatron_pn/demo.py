"""`make demo`: the whole SLM-pn pipeline on the corpus shipped in data/, on a laptop CPU.

  1. SentencePiece tokenizer on the generic corpus             (pn-data train-tokenizer)
  2. Megatron indexed datasets: generic + each domain           (pn-data preprocess)
  3. Sentence-BERT window embeddings, k-means into 4 clusters   (pn-data embed, cluster)
  4. each domain's specialization set assigned to the clusters  (pn-data assign)
  5. a tiny projected network (4 experts) pretrained, 2 procs   (pn-train configs/tiny/pn.yaml)
  6. per domain: project the most frequent cluster's expert, evaluate, fine-tune with early
     stopping, evaluate again                                  (pn-project, pn-train, pn-eval)
  7. one fine-tuned expert exported to Hugging Face             (pn-export-hf)

Every step is one of the project's commands, run as a user would; finished steps are kept in
demo_out/ and skipped on a re-run. The corpus is cut to sizes that keep the demo to minutes.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

from megatron_pn.costs import device_hours
from megatron_pn.experiment.runner import first_documents, step_env

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "data" / "corpus"
DOMAINS = ("bible", "python_docs", "postgres_docs", "manpages", "fortunes")
GENERIC_CHARS = 4_000_000  # ~1.2M tokens: ~1,200 embedding windows
SPEC_CHARS = 200_000  # a small specialization set per domain


class Demo:
    def __init__(self, out: Path, pretrain_steps: int, generic_chars: int = GENERIC_CHARS,
                 spec_chars: int = SPEC_CHARS, finetune_steps: int | None = None,
                 domains=DOMAINS):
        self.out, self.pretrain_steps = out, pretrain_steps
        self.generic_chars, self.spec_chars = generic_chars, spec_chars
        self.finetune_steps, self.domains = finetune_steps, tuple(domains)
        self.timings: dict[str, float] = {}
        self.tokenizer = out / "tokenizer" / "spm"

    def run(self, title: str, cmd: list[str], done: Path | None = None) -> None:
        """Run one command unless its output exists (a re-run continues where it stopped)."""
        if done is not None and done.exists():
            print(f"=== {title}: done ({done})", flush=True)
            return
        print(f"\n=== {title}\n$ {' '.join(map(str, cmd))}", flush=True)
        start = time.time()
        # Each step is a fresh job: no launcher variables of ours (RANK, MASTER_PORT, ...)
        # leak into it; library deprecation warnings are noise for someone watching the demo.
        subprocess.run([str(c) for c in cmd], cwd=REPO, check=True, env=step_env(None))
        key = title.split(":")[0]
        self.timings[key] = self.timings.get(key, 0.0) + time.time() - start

    @staticmethod
    def pn_data(*args) -> list:
        return [sys.executable, "-m", "data_tools", *args]

    @staticmethod
    def module(name: str, *args, nproc: int = 1) -> list:
        if nproc == 1:
            return [sys.executable, "-m", name, *args]
        return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", nproc,
                "-m", name, *args]

    # -- data -----------------------------------------------------------------------------------

    def preprocess(self, name: str, source: Path) -> Path:
        prefix = self.out / "data" / name
        self.run(f"2. indexed dataset: {name}", self.pn_data(
            "preprocess", "--input", source, "--tokenizer-model", f"{self.tokenizer}.model",
            "--output-prefix", prefix, "--workers", "2"), Path(f"{prefix}.idx"))
        return prefix

    def prepare_data(self) -> dict:
        generic = first_documents(CORPUS / "generic" / "train.jsonl.gz",
                                  self.out / "corpus" / "generic.jsonl.gz", self.generic_chars)
        self.run("1. SentencePiece tokenizer (4k vocabulary)", self.pn_data(
            "train-tokenizer", "--input", generic, "--vocab-size", "4096", "--output",
            self.tokenizer), Path(f"{self.tokenizer}.model"))
        data = {"generic": self.preprocess("generic", generic)}
        for domain in self.domains:
            spec = first_documents(CORPUS / domain / "train.jsonl.gz",
                                   self.out / "corpus" / f"{domain}_train.jsonl.gz",
                                   self.spec_chars)
            data[f"{domain}_train"] = self.preprocess(f"{domain}_train", spec)
            data[f"{domain}_valid"] = self.preprocess(f"{domain}_valid",
                                                      CORPUS / domain / "valid.jsonl.gz")
        return data

    def cluster(self, data: dict) -> Path:
        embeddings, clusters = self.out / "embeddings" / "generic", self.out / "clusters"
        self.run("3. Sentence-BERT embeddings of generic windows", self.pn_data(
            "embed", "--data-prefix", data["generic"], "--tokenizer-model",
            f"{self.tokenizer}.model", "--output", embeddings), embeddings / "meta.json")
        self.run("3. k-means: 4 clusters", self.pn_data(
            "cluster", "--embeddings", embeddings, "--k", "4", "--output", clusters),
            clusters / "clusters.json")
        for domain in self.domains:
            self.run(f"4. assign: {domain}", self.pn_data(
                "assign", "--data-prefix", data[f"{domain}_train"], "--clusters", clusters,
                "--output", self.out / "assign" / domain),
                self.out / "assign" / domain / "histogram.json")
        return clusters

    # -- models ---------------------------------------------------------------------------------

    def pretrain(self, clusters: Path) -> Path:
        run_dir = self.out / "pn"
        self.run("5. pretrain a tiny projected network (4 experts), 2 CPU processes",
                 self.module("megatron_pn.train", "configs/tiny/pn.yaml",
                             f"data.blend_file={clusters / 'generic_blend.json'}",
                             f"data.tokenizer_model={self.tokenizer}.model",
                             "data.split=80,20,0",  # every cluster keeps validation windows
                             f"train.steps={self.pretrain_steps}", "train.eval_interval=100",
                             "train.log_interval=50", "logging.progress_bar=true",
                             "logging.phase=pretrain", f"logging.run_dir={run_dir}",
                             f"checkpoint.dir={run_dir / 'ckpt'}", nproc=2),
                 run_dir / "ckpt" / "latest_checkpointed_iteration.txt")
        return run_dir / "ckpt"

    def evaluate(self, title: str, checkpoint: Path, data: Path, output: Path) -> float:
        self.run(title, self.module("megatron_pn.evaluate", "--checkpoint", checkpoint,
                                    "--data", data, "--output", output, "--quiet"), output)
        return json.loads(output.read_text())["datasets"][0]["nll"]

    def specialize(self, domain: str, pn_ckpt: Path, data: dict) -> dict:
        spec = self.out / "spec" / domain
        projected = spec / "projected"
        self.run(f"6. {domain}: project the most frequent cluster's expert", self.module(
            "megatron_pn.project", "--checkpoint", pn_ckpt, "--spec-data",
            self.out / "assign" / domain, "--strategy", "most-frequent", "--output", projected),
            projected / "latest_checkpointed_iteration.txt")
        before = self.evaluate(f"6. {domain}: evaluate the projected expert", projected,
                               data[f"{domain}_valid"], spec / "eval_projected.json")
        self.run(f"6. {domain}: fine-tune (lr / 3, early stopping)", self.module(
            "megatron_pn.train", "configs/tiny/slm.yaml", "configs/finetune/tiny.yaml",
            f"checkpoint.load={projected}", f"checkpoint.dir={spec / 'ft'}",
            f"data.blend=[{data[f'{domain}_train']}]",
            f"data.valid_blend=[{data[f'{domain}_valid']}]",
            f"data.tokenizer_model={self.tokenizer}.model", f"logging.run_dir={spec / 'ft'}",
            *([f"train.steps={self.finetune_steps}"] if self.finetune_steps else [])),
            spec / "ft" / "best_checkpointed_iteration.txt")
        after = self.evaluate(f"6. {domain}: evaluate the fine-tuned expert", spec / "ft",
                              data[f"{domain}_valid"], spec / "eval_finetuned.json")
        histogram = json.loads((self.out / "assign" / domain / "histogram.json").read_text())
        tokens = histogram["tokens"]
        cost = json.loads((spec / "ft" / "cost.json").read_text())
        return {"domain": domain, "expert": max(range(len(tokens)), key=tokens.__getitem__),
                "top_fraction": max(tokens) / sum(tokens), "nll_projected": before,
                "nll_finetuned": after, "ft_steps": sum(r["steps"] for r in cost["runs"]),
                "ft_device_seconds": 3600 * device_hours(spec / "ft")}

    def export(self, domain: str) -> Path:
        target = self.out / "hf" / domain
        self.run(f"7. {domain}: export to Hugging Face", self.module(
            "megatron_pn.hf", "--checkpoint", self.out / "spec" / domain / "ft",
            "--output", target, "--tokenizer", f"{self.tokenizer}_hf"), target / "config.json")
        return target


def report(results: list[dict], demo: Demo, hf_dir: Path, wall: float) -> None:
    print("\n=== Results: SLM-pn specialization on the embedded corpus (tiny model, CPU)\n")
    print("| domain | expert (cluster share) | ppl projected | ppl fine-tuned | ft steps | "
          "ft device-s |")
    print("|---|---|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['domain']} | {r['expert']} ({r['top_fraction']:.0%}) | "
              f"{math.exp(r['nll_projected']):.1f} | {math.exp(r['nll_finetuned']):.1f} | "
              f"{r['ft_steps']} | {r['ft_device_seconds']:.0f} |")
    macro = [math.exp(sum(r[k] for r in results) / len(results))
             for k in ("nll_projected", "nll_finetuned")]
    print(f"| **macro-average** | | **{macro[0]:.1f}** | **{macro[1]:.1f}** | | |")
    print(f"\nuniform over the 4096-token vocabulary: ppl 4096. Wall time {wall / 60:.1f} min: "
          + ", ".join(f"{k} {v:.0f}s" for k, v in demo.timings.items()))
    print(f"outputs: {demo.out} (pn/ pretraining run, spec/<domain>/ projections, fine-tuning "
          f"runs and evaluations); Hugging Face model: {hf_dir}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "demo_out"), help="working directory")
    parser.add_argument("--pretrain-steps", type=int, default=300, help="PN pretraining steps")
    parser.add_argument("--finetune-steps", type=int, default=None,
                        help="fine-tuning step cap (default: configs/finetune/tiny.yaml's)")
    parser.add_argument("--domains", default=",".join(DOMAINS), help="comma-separated domains")
    parser.add_argument("--generic-chars", type=int, default=GENERIC_CHARS,
                        help="characters of generic text used")
    parser.add_argument("--spec-chars", type=int, default=SPEC_CHARS,
                        help="characters of each domain's specialization set")
    args = parser.parse_args(argv)
    start = time.time()
    demo = Demo(Path(args.out), args.pretrain_steps, args.generic_chars, args.spec_chars,
                args.finetune_steps, args.domains.split(","))
    data = demo.prepare_data()
    clusters = demo.cluster(data)
    pn_ckpt = demo.pretrain(clusters)
    results = [demo.specialize(domain, pn_ckpt, data) for domain in demo.domains]
    hf_dir = demo.export(demo.domains[0])
    report(results, demo, hf_dir, time.time() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
