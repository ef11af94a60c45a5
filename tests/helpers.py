"""Test data and process helpers shared by the test modules."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from megatron_pn.distributed import free_port  # noqa: F401  (tests import it from here)

REPO = Path(__file__).resolve().parents[1]
EOD = 256  # byte-level test tokenizer: ids 0-255 are bytes, 256 ends a document


def real_text_documents(limit_chars: int = 400_000) -> list[str]:
    """Real documents: the embedded corpus when present, else this repository's own text."""
    corpus = REPO / "data" / "corpus" / "generic" / "train.jsonl.gz"
    docs: list[str] = []
    if corpus.is_file():
        import gzip

        with gzip.open(corpus, "rt", encoding="utf-8") as f:
            for line in f:
                docs.append(json.loads(line)["text"])
                if sum(map(len, docs)) > limit_chars:
                    break
        return docs
    for path in sorted(REPO.glob("**/*.py")) + sorted(REPO.glob("**/*.md")):
        if ".venv" not in path.parts:
            docs.append(path.read_text(encoding="utf-8", errors="replace"))
    return docs


def write_byte_dataset(prefix: Path, docs: list[str]) -> Path:
    """Megatron .bin/.idx of UTF-8 bytes + EOD, written with megatron-core's builder."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix.parent.mkdir(parents=True, exist_ok=True)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for doc in docs:
        ids = np.frombuffer(doc.encode("utf-8"), dtype=np.uint8).astype(np.uint16)
        builder.add_document(torch.from_numpy(np.append(ids, EOD)), [len(ids) + 1])
    builder.finalize(f"{prefix}.idx")
    return prefix


def tiny_overrides(prefix: Path, run_dir: Path, **extra) -> list[str]:
    """Overrides that point configs/tiny/slm.yaml at a byte-level dataset, deterministic."""
    values = {
        "data.blend": f"[{prefix}]",
        "data.eod_id": EOD,
        "model.vocab_size": 257,
        "logging.run_dir": str(run_dir),
        "logging.tensorboard": "false",
        "train.eval_interval": 0,
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


def train_command(args: list[str], nproc: int = 1) -> list[str]:
    """pn-train in fresh processes (torchrun when nproc > 1)."""
    if nproc == 1:
        return [sys.executable, "-m", "megatron_pn.cli.train", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-port", str(free_port()), "-m", "megatron_pn.cli.train", *args]


def train_env(extra=None) -> dict:
    """This environment without launcher variables an in-process test may have set."""
    from megatron_pn.experiment.runner import step_env

    return {**step_env(threads=1), **(extra or {})}


def start_train(args: list[str], nproc: int = 1, log_path: Path | None = None) -> subprocess.Popen:
    out = open(log_path, "w") if log_path else subprocess.DEVNULL
    return subprocess.Popen(train_command(args, nproc), cwd=REPO, env=train_env(),
                            stdout=out, stderr=subprocess.STDOUT)


def run_train(args: list[str], nproc: int = 1, timeout: int = 600, env=None,
              check: bool = True) -> subprocess.CompletedProcess:
    cmd = train_command(args, nproc)
    proc = subprocess.run(cmd, cwd=REPO, env=train_env(env), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}"
                             f"\n{proc.stderr[-5000:]}")
    return proc


def read_metrics(run_dir: Path, split: str = "train") -> dict[int, dict]:
    """The last record of each step (a resumed run re-logs the steps it redoes)."""
    records = {}
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return records
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by SIGKILL
            continue
        if record["split"] == split:
            records[record["step"]] = record
    return records


def losses(run_dir: Path) -> list[float]:
    metrics = read_metrics(run_dir)
    return [metrics[s]["loss"] for s in sorted(metrics)]


def write_cluster_datasets(root: Path, num_clusters: int = 4) -> Path:
    """Per-cluster byte-level datasets and a blend file as `pn-data cluster` writes them
    (generic_blend.json: [[weight, prefix], ...] and the cluster id of each entry)."""
    docs = real_text_documents()
    blend, ids = [], []
    for cluster in range(num_clusters):
        members = docs[cluster::num_clusters]
        if cluster % 2:  # make clusters tell apart: odd ones upper-case
            members = [d.upper() for d in members]
        prefix = write_byte_dataset(root / f"cluster_{cluster:04d}", members)
        blend.append([float(sum(map(len, members))), str(prefix)])
        ids.append(cluster)
    path = root / "generic_blend.json"
    path.write_text(json.dumps({"blend": blend, "cluster_ids": ids}))
    return path


def tiny_pn_overrides(blend_file: Path, run_dir: Path, **extra) -> list[str]:
    values = {"data.blend_file": blend_file, "data.eod_id": EOD, "model.vocab_size": 257,
              "logging.run_dir": run_dir, "logging.tensorboard": "false",
              "train.eval_interval": 0, **extra}
    return [f"{k}={v}" for k, v in values.items()]


def perturbed_model(cfg, seed: int = 0):
    """The config's model (in a megatron world of one) with every weight perturbed, so that
    norm weights and biases matter too; eval mode."""
    import torch

    from megatron_pn.model import build_gpt, transformer_config

    model = build_gpt(cfg, transformer_config(cfg, "cpu")).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


@contextlib.contextmanager
def world_of_one():
    """A megatron-core world of one process (gloo, CPU) for the duration of the block, unless
    one is already up (then that one is used and left as it was); the launcher variables it
    sets are restored after, so later in-process commands start their own."""
    import os

    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from megatron_pn import compat
    from megatron_pn.distributed import init_distributed, shutdown

    if ps.model_parallel_is_initialized():
        yield
        return
    with launcher_env_restored():
        compat.activate()
        init_distributed("cpu")
        try:
            ps.initialize_model_parallel(1, 1)
            tensor_parallel.model_parallel_cuda_manual_seed(0)
            yield
        finally:
            shutdown()


@contextlib.contextmanager
def launcher_env_restored():
    """The launcher variables (RANK, MASTER_PORT, ...) as they were before the block: a world
    of one started in it sets them, and a later one must pick its own port."""
    import os

    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    saved = {key: os.environ.get(key) for key in keys}
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def write_model_checkpoint(path: Path, config_files: list[str], overrides=()) -> Path:
    """A model-only checkpoint (what pn-project and pn-import-hf write: weights, run config,
    model.yaml) of the config's freshly initialized model, written in this process without a
    training step: for tests that need a checkpoint to exist and load, not to be trained."""
    from megatron_pn.config import load_config
    from megatron_pn.hf import write_checkpoint
    from megatron_pn.model import build_gpt, transformer_config

    cfg = load_config(list(config_files), [str(o) for o in overrides])
    with world_of_one():
        model = build_gpt(cfg, transformer_config(cfg, "cpu"))
        return write_checkpoint(model, cfg, path)


def write_run_checkpoints(config_files: list[str], overrides, steps) -> Path:
    """checkpoint.dir as a run leaves it after saving at each of `steps` (weights, optimizer,
    scheduler, RNG, run config, tokenizer record; `latest` the last), saved by pn-train's
    Trainer without training a step: for tests of resuming, damage and refusals."""
    from megatron_pn.config import load_config
    from megatron_pn.distributed import shutdown
    from megatron_pn.trainer import Trainer

    cfg = load_config(list(config_files), [str(o) for o in overrides])
    with launcher_env_restored():
        trainer = Trainer(cfg)
        try:
            for step in steps:
                trainer.step = step
                trainer.save()
        finally:
            trainer.close()
            shutdown()
    return Path(cfg.checkpoint.dir)
