"""`pn-project`: one expert of a projected network, in closed form, as a dense SLM checkpoint.

    pn-project --checkpoint runs/pn32/checkpoints --spec-data runs/spec/arxiv_assign \\
        --strategy most-frequent --output runs/spec/arxiv_slm

`--spec-data` is the output directory of `pn-data assign` for the specialization set (its
cluster histogram, and the indexed dataset it was computed from). Strategies (paper, Table 5):
  most-frequent  the expert of the spec set's most frequent cluster
  best-loss      the expert with the lowest loss on a sample of the spec set
  soft           one projection of the histogram-weighted code sum_i p(i|spec) E[i] (beyond the
                 paper; with a one-hot histogram it is most-frequent)
  cluster=I      expert I
The output is the checkpoint format `pn-train` writes (model weights only, any TP/PP on load):
fine-tune it with `pn-train CONFIG checkpoint.load=OUTPUT ...`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from megatron_pn.config import Config
from megatron_pn.fileio import atomic_write_json, check_writable
from megatron_pn.standalone import ToolError

STRATEGIES = ("most-frequent", "best-loss", "soft", "cluster=I")


class ProjectionError(ToolError):
    pass


# -- the specialization set -----------------------------------------------------------------------

def read_spec(spec_dir: Path, k: int) -> dict:
    path = spec_dir / "histogram.json"
    if not path.is_file():
        raise ProjectionError(f"--spec-data {spec_dir}: no histogram.json; give the output "
                              "directory of `pn-data assign` for the specialization set")
    spec = json.loads(path.read_text())
    if spec.get("k") != k:
        raise ProjectionError(f"--spec-data {spec_dir}: assigned to {spec.get('k')} clusters but "
                              f"the checkpoint has {k} experts")
    tokens = np.asarray(spec["tokens"], dtype=np.float64)
    if tokens.sum() <= 0:
        raise ProjectionError(f"--spec-data {spec_dir}: the specialization set has no tokens")
    spec["p"] = tokens / tokens.sum()
    return spec


def check_same_clustering(cfg: Config, spec: dict, spec_dir: Path) -> None:
    """The spec set must be assigned with the centroids (and tokenizer) the PN was trained on."""
    if not cfg.data.blend_file:
        return
    manifest = Path(cfg.data.blend_file).parent / "clusters.json"
    if not manifest.is_file():
        return
    clusters = json.loads(manifest.read_text())
    for key, what in (("centroids_sha256", "centroids"), ("tokenizer_sha256", "tokenizer")):
        if clusters.get(key) and spec.get(key) and clusters[key] != spec[key]:
            raise ProjectionError(
                f"--spec-data {spec_dir} was assigned with other {what} ({spec[key][:12]}) than "
                f"the clustering the checkpoint trained on ({manifest}: {clusters[key][:12]}); "
                f"re-run `pn-data assign --clusters {manifest.parent}`"
            )
    if cfg.data.tokenizer_model and Path(cfg.data.tokenizer_model).is_file() and spec.get(
            "tokenizer_sha256"):
        sha = hashlib.sha256(Path(cfg.data.tokenizer_model).read_bytes()).hexdigest()
        if sha != spec["tokenizer_sha256"]:
            raise ProjectionError(
                f"--spec-data {spec_dir}: tokenized with another tokenizer than the checkpoint's "
                f"data.tokenizer_model {cfg.data.tokenizer_model}"
            )


# -- choosing the expert --------------------------------------------------------------------------

def spec_sample(prefix: str, seq_length: int, max_tokens: int) -> torch.Tensor:
    """[n, seq_length + 1] token windows from the start of the spec set's token stream."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix, mmap=True)
    stream, total = [], 0
    for i in range(len(dataset)):
        doc = np.asarray(dataset[i], dtype=np.int64)
        stream.append(doc)
        total += len(doc)
        if total >= max_tokens:
            break
    tokens = np.concatenate(stream)[:max_tokens]
    n = (len(tokens) - 1) // seq_length
    if n == 0:
        raise ProjectionError(f"spec data {prefix}: fewer than {seq_length + 1} tokens")
    windows = [tokens[i * seq_length:(i + 1) * seq_length + 1] for i in range(n)]
    return torch.from_numpy(np.stack(windows))


@torch.no_grad()
def expert_losses(model, windows: torch.Tensor, k: int, device, batch_size: int = 8) -> np.ndarray:
    """Mean token loss of every expert on the same windows (all rows routed to that expert)."""
    losses = np.zeros(k)
    positions = torch.arange(windows.shape[1] - 1, device=device)
    for expert in range(k):
        total, count = 0.0, 0
        for start in range(0, len(windows), batch_size):
            batch = windows[start:start + batch_size].to(device)
            ids = [expert] * len(batch)
            loss = model(batch[:, :-1], positions.expand(len(batch), -1), None,
                         labels=batch[:, 1:], cluster_ids=ids)
            total += loss.float().sum().item()
            count += loss.numel()
        losses[expert] = total / count
    return losses


def choose(strategy: str, spec: dict, model, cfg: Config, device, sample_tokens: int):
    """(expert or None, code or None, details) for a strategy."""
    p, k = spec["p"], len(spec["p"])
    if strategy == "most-frequent":
        expert = int(np.argmax(p))
        return expert, None, {"p_expert": float(p[expert])}
    if strategy.startswith("cluster="):
        expert = int(strategy.split("=", 1)[1])
        if not 0 <= expert < k:
            raise ProjectionError(f"--strategy {strategy}: the checkpoint has experts 0..{k - 1}")
        return expert, None, {"p_expert": float(p[expert])}
    if strategy == "soft":
        code = torch.from_numpy(p).to(model.expert_codes) @ model.expert_codes
        return None, code, {"histogram": p.tolist()}
    if strategy == "best-loss":
        windows = spec_sample(spec["source_prefix"], cfg.model.seq_length, sample_tokens)
        losses = expert_losses(model.eval(), windows, k, device)
        expert = int(np.argmin(losses))
        return expert, None, {"losses": losses.tolist(), "sample_windows": len(windows)}
    raise ProjectionError(f"--strategy {strategy}: choose one of {', '.join(STRATEGIES)}")


# -- the command ----------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pn-project", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a PN checkpoint (root or iter dir)")
    parser.add_argument("--spec-data", required=True, type=Path,
                        help="`pn-data assign` output directory of the specialization set")
    parser.add_argument("--strategy", default="most-frequent",
                        help=f"one of {', '.join(STRATEGIES)} (default: most-frequent)")
    parser.add_argument("--output", required=True, type=Path, help="dense checkpoint directory")
    parser.add_argument("--sample-tokens", type=int, default=65536,
                        help="best-loss: spec tokens each expert is scored on (default 65536)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    return parser


def project(args) -> dict:
    import dataclasses

    from megatron_pn import checkpoint  # megatron-core: seconds to import, not for --help
    from megatron_pn.model import build_model_chunks, transformer_config
    from megatron_pn.pn.projection import dense_state_dict
    from megatron_pn.standalone import inference_world, load_model, resolve_checkpoint

    start = time.time()
    check_writable(args.output, args.overwrite)
    cfg = checkpoint.saved_config(resolve_checkpoint(args.checkpoint))
    if cfg.model.type != "pn":
        raise ProjectionError(f"--checkpoint {args.checkpoint} is a {cfg.model.type} checkpoint; "
                              "pn-project needs a projected network (model.type pn)")
    spec = read_spec(args.spec_data, cfg.model.num_experts)
    check_same_clustering(cfg, spec, args.spec_data)
    with inference_world(single_process=True) as env:
        loaded = load_model(args.checkpoint, env)
        expert, code, details = choose(args.strategy, spec, loaded.model, loaded.cfg, env.device,
                                       args.sample_tokens)
        dense_cfg = dataclasses.replace(loaded.cfg, model=dataclasses.replace(
            loaded.cfg.model, type="dense", num_experts=0, bank_size=0, code_size=0,
            project_attention=False))
        tconfig = transformer_config(dense_cfg, env.device.type)
        tconfig.perform_initialization = False  # every weight comes from the projection
        dense = build_model_chunks(dense_cfg, tconfig)[0]
        load_every_weight(dense, dense_state_dict(loaded.model, expert, code))
        record = {"source": str(loaded.path), "strategy": args.strategy, "expert": expert,
                  "spec_data": str(args.spec_data), **details,
                  "seconds": time.time() - start}
        checkpoint.save(args.output, 0, [dense], extra={"config": dense_cfg.to_dict(),
                                                        "projection": record})
        if env.rank == 0:  # the choice, readable without loading the checkpoint
            atomic_write_json(Path(args.output) / "projection.json", record)
    return record


def load_every_weight(dense, state: dict) -> None:
    """Strict loading (megatron's `_extra_state` entries aside): a weight the projection did
    not produce would stay uninitialized memory."""
    missing, unexpected = dense.load_state_dict(state, strict=False)
    missing = [key for key in missing if not key.endswith("_extra_state")]
    if missing or unexpected:
        raise RuntimeError(f"the projected state does not fit the dense model: missing "
                           f"{missing[:3]}, unexpected {unexpected[:3]}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_pn.standalone import is_user_error

    try:
        record = project(args)
    except Exception as err:
        if not is_user_error(err):
            raise
        print(f"pn-project: error: {err}", file=sys.stderr)
        return 2
    chosen = record["expert"] if record["expert"] is not None else "soft mixture"
    print(f"projected expert {chosen} ({record['strategy']}) of {record['source']} -> "
          f"{args.output} in {record['seconds']:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
