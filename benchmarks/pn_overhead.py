"""Cost of a projected network (k=32, h=23, m=16) over the dense SLM of the same expert shape,
measured in one run on this device and printed as ratios.

    python benchmarks/pn_overhead.py              # CPU: a reduced size (d 256, 4 layers, seq 256)
    python benchmarks/pn_overhead.py --paper      # the paper's 126M expert shape (use a GPU)
    python benchmarks/pn_overhead.py --tiny --only step   # seconds: a smoke run

Three measurements, each in interleaved rounds (best of each: robust to a busy host):
  1. step:       `pn-train` step time, PN over dense, with micro-batches that mix clusters (one
                 projected matrix per distinct cluster in each micro-batch) and with
                 `data.group_by_cluster` (micro-batches of one or two clusters); under the
                 megatron engine, and under DeepSpeed ZeRO-2 against a dense DeepSpeed step.
  2. validation: forward-only (no grad) tokens/s of the same models, mixed and one cluster.
  3. mlp:        one MLP's forward+backward and no-grad forward on a mixed micro-batch for the
                 ways of applying per-expert weights: the dense MLP; per-expert slices of the
                 sequence-first [s, b, d] activations (strided: torch runs s tiny GEMMs); rows
                 regrouped once per MLP call so each expert's block is contiguous (what PNMLP
                 does), then one GEMM per expert (the loop) or one torch._grouped_mm call
                 (train.pn_grouped_gemm), on the projection's [u, out, in] weights or on the
                 step's weights stacked per call (projected once per step); one expert for the
                 whole micro-batch. `--paper --only mlp` is gpu_check.sh's grouped-vs-loop row.
Goals (issue 11): PN step <= 1.25x dense on CPU with mixed micro-batches; <= 1.15x on a GPU at
the paper's shape; (issue 26) under DeepSpeed <= 1.15x its dense step at the reduced shape.
Mixture training (data.mixture: one code per step or micro-batch, so one projected matrix per
step or micro-batch): <= 1.25x dense on CPU. Each expert is projected once per step
(train.pn_project_once_per_step; the "projected per micro-batch" rows turn that off), so the
floor is the projection and its backward once per step (2*u*h*out*in FLOPs each, u distinct
experts in the step) and Adam over h x the MLP parameters.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from train_throughput import RunFailed, measure, random_dataset, write_section  # noqa: E402

from megatron_pn import compat  # noqa: E402
from megatron_pn.config import load_config  # noqa: E402
from megatron_pn.metrics import device_description  # noqa: E402
from megatron_pn.model import params_dtype  # noqa: E402
from megatron_pn.pn.layers import grouped_linear  # noqa: E402

SECTION = "## PN overhead"
SLM, PN = "configs/paper/slm.yaml", "configs/paper/pn32.yaml"
STEP_RUNS = ("dense", "pn", "pn_per_micro_batch", "pn_gemm", "by_cluster", "mixture_step",
             "mixture_micro_batch", "ds_dense", "ds_pn", "ds_pn_per_micro_batch")
REDUCED = ["model.hidden_size=256", "model.ffn_hidden_size=688", "model.num_attention_heads=4",
           "model.num_layers=4", "model.seq_length=256", "model.vocab_size=8192",
           "train.micro_batch_size=4", "train.global_batch_size=16"]
TINY = ["model.hidden_size=64", "model.ffn_hidden_size=176", "model.num_attention_heads=4",
        "model.num_layers=2", "model.seq_length=64", "model.vocab_size=512",
        "train.micro_batch_size=2", "train.global_batch_size=8"]


def cluster_blend(root: Path, k: int, vocab: int, tokens_per_cluster: int) -> Path:
    blend = []
    root.mkdir(parents=True, exist_ok=True)
    for cluster in range(k):
        prefix = root / f"cluster_{cluster:04d}"
        random_dataset(prefix, vocab, tokens_per_cluster, seed=cluster)
        blend.append([1.0, str(prefix)])
    path = root / "generic_blend.json"
    path.write_text(json.dumps({"blend": blend, "cluster_ids": list(range(k))}))
    return path


DEEPSPEED = ["engine=deepspeed", "deepspeed.zero_stage=2"]


def step_runs(common: list[str], dense: list[str]) -> dict:
    """key -> (row, config, overrides, the row it is measured against: None for the first)."""
    # the per-expert GEMM path train.pn_grouped_gemm=auto does not take here (params' dtype)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    grouped = compat.grouped_gemm("auto", device, params_dtype(load_config([PN]), device.type))
    other = "loop" if grouped else "grouped"
    ds_dense = "dense SLM, DeepSpeed ZeRO-2"
    return {
        "dense": ("dense SLM (baseline)", SLM, dense, None),
        "pn": ("PN, mixed micro-batches", PN, common, None),
        "pn_per_micro_batch": ("PN, mixed, projected per micro-batch", PN, common + [
            "train.pn_project_once_per_step=false"], None),
        "pn_gemm": (f"PN, mixed, train.pn_grouped_gemm={other}", PN, common + [
            f"train.pn_grouped_gemm={other}"], None),
        "by_cluster": ("PN, data.group_by_cluster", PN, common + ["data.group_by_cluster=true"],
                       None),
        "mixture_step": ("PN, mixture training per step", PN, common + ["data.mixture=step"],
                         None),
        "mixture_micro_batch": ("PN, mixture training per micro-batch, learned map", PN,
                                common + ["data.mixture=micro_batch", "model.code_map=learned"],
                                None),
        "ds_dense": (ds_dense, SLM, dense + DEEPSPEED, None),
        "ds_pn": ("PN, DeepSpeed ZeRO-2, mixed", PN, common + DEEPSPEED, ds_dense),
        "ds_pn_per_micro_batch": ("PN, DeepSpeed ZeRO-2, mixed, projected per micro-batch", PN,
                                  common + DEEPSPEED + ["train.pn_project_once_per_step=false"],
                                  ds_dense),
    }


def step_times(shape: list[str], vocab: int, args, work: Path) -> tuple[dict, dict]:
    """tokens/s of training steps (subprocess runs, interleaved rounds, best of each), and
    each row's baseline row."""
    tokens = (args.steps + 2) * 128 * 1025 * 2 // 32 if args.paper else 200_000
    blend = cluster_blend(work / "clusters", 32, vocab, tokens)
    common = shape + [f"data.blend_file={blend}"]
    dense = common + ["data.blend_file=null", f"data.blend=[{work / 'clusters' / 'cluster_0000'}]"]
    runs = {key: run for key, run in step_runs(common, dense).items()
            if key in (args.runs or STEP_RUNS)}
    best = {}
    for _ in range(args.rounds):
        for name, config, overrides, _ in runs.values():
            try:
                rate = measure(config, overrides, 1, args.steps, args.warmup, work)["tokens_per_s"]
                best[name] = max(best.get(name) or 0.0, rate)
            except RunFailed as error:  # the other variants still run; the table says which
                best.setdefault(name, None)
                rate = error
            print(f"{name}: {rate}", flush=True)  # kept in the log if the run is cut short
    return best, {name: base for name, _, _, base in runs.values() if base}


def validation_rates(shape: list[str], args) -> dict:
    """Forward-only tokens/s in this process (no grad, as validation and pn-eval run)."""
    from megatron.core import tensor_parallel

    from megatron_pn.model import build_gpt, transformer_config
    from megatron_pn.pn import projected_once
    from megatron_pn.checkpoint_tools import inference_world

    with inference_world(single_process=True) as env:
        tensor_parallel.model_parallel_cuda_manual_seed(0)
        models = {}
        for name, config in (("dense", SLM), ("pn", PN)):
            cfg = load_config([config], shape + ["model.hidden_dropout=0",
                                                 "model.attention_dropout=0"])
            models[name] = build_gpt(cfg, transformer_config(cfg, env.device.type)).to(
                env.device).eval()
        b, s = cfg.train.micro_batch_size, cfg.model.seq_length
        tokens = torch.randint(0, cfg.model.vocab_size, (b, s), device=env.device)
        positions = torch.arange(s, device=env.device).expand(b, s)
        generator = torch.Generator().manual_seed(0)
        calls = {
            "dense SLM (baseline)": lambda: models["dense"](tokens, positions, None),
            "PN, mixed micro-batches": lambda: models["pn"](
                tokens, positions, None,
                cluster_ids=torch.randint(0, 32, (b,), generator=generator)),
            "PN, one cluster per micro-batch": lambda: models["pn"](
                tokens, positions, None, cluster_ids=[3] * b),
        }
        best = {}
        # as an evaluation runs: each expert projected once for all its batches (projected_once)
        with torch.no_grad(), projected_once([models["pn"]]):
            for _ in range(args.rounds):
                for name, call in calls.items():
                    seconds = _best_time(call, env.device, repeats=3 if not args.paper else 10)
                    best[name] = max(best.get(name, 0.0), b * s / seconds)
    return best


def mlp_alternatives(args) -> dict:
    """ms per call of one SwiGLU MLP (fwd+bwd, no-grad fwd), b rows of b different experts."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    d, ffn, h, s, b = ((1024, 2736, 23, 1024, 8) if args.paper else (64, 176, 23, 64, 4)
                       if args.tiny else (256, 688, 23, 256, 4))

    def tensor(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)

    fc1, fc2 = tensor(2 * ffn * d, h), tensor(d * ffn, h)
    alpha = tensor(b, h)  # one expert per row
    x = tensor(s, b, d)
    dense_fc1, dense_fc2 = tensor(2 * ffn, d), tensor(d, ffn)
    experts = (1,) * b  # rows of each expert, in grouped order

    def weights(bank, out, inp, rows):
        return F.linear(alpha[:rows], bank).view(rows, out, inp)

    def swiglu(y):
        gate, up = y.chunk(2, dim=-1)
        return F.silu(gate) * up

    def dense():
        return F.linear(swiglu(F.linear(x, dense_fc1)), dense_fc2)

    def one_expert():  # one projected matrix per linear for the whole micro-batch
        w1, w2 = weights(fc1, 2 * ffn, d, 1)[0], weights(fc2, d, ffn, 1)[0]
        return F.linear(swiglu(F.linear(x, w1)), w2)

    def strided():  # per-expert slices x[:, j] of [s, b, d]
        w1, w2 = weights(fc1, 2 * ffn, d, b), weights(fc2, d, ffn, b)
        y = torch.cat([F.linear(x[:, j:j + 1], w1[j]) for j in range(b)], dim=1)
        y = swiglu(y)
        return torch.cat([F.linear(y[:, j:j + 1], w2[j]) for j in range(b)], dim=1)

    def regrouped(apply):  # [b, s, d] once per MLP call: each expert's rows contiguous
        def mlp():
            w1, w2 = weights(fc1, 2 * ffn, d, b), weights(fc2, d, ffn, b)
            rows = x.transpose(0, 1).contiguous()
            return apply(swiglu(apply(rows, w1)), w2).transpose(0, 1).contiguous()
        return mlp

    def loop(rows, w):  # one GEMM per expert (ProjectedLinear._per_expert's loop)
        return torch.cat([F.linear(rows[j:j + 1], w[j]) for j in range(b)])

    def grouped(rows, w):  # one torch._grouped_mm on the projection's [u, out, in]
        return grouped_linear(rows, w, experts)

    def grouped_stacked(rows, w):  # the step's per-expert W (projected once) stacked per call
        return grouped_linear(rows, torch.stack(list(w.unbind(0))), experts)

    variants = {"dense MLP (baseline)": dense, "PN, strided expert slices": strided,
                "PN, regrouped once per MLP, loop": regrouped(loop),
                "PN, regrouped, grouped GEMM": regrouped(grouped),
                "PN, regrouped, grouped GEMM, W stacked per call": regrouped(grouped_stacked),
                "PN, one expert": one_expert}
    best = {}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            train = _best_time(lambda: fn().sum().backward(), device, repeats=3)
            with torch.no_grad():
                infer = _best_time(fn, device, repeats=3)
            old = best.get(name, (float("inf"), float("inf")))
            best[name] = (min(old[0], train * 1e3), min(old[1], infer * 1e3))
    return best


def _best_time(call, device, repeats: int) -> float:
    """Seconds of the fastest of `repeats` calls, after one warm-up call."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    call()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        call()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


def ratio_table(title: str, rates: dict, unit: str = "tokens/s", baselines=None) -> list[str]:
    """Rates against their baseline (`baselines`: name -> its baseline's name; the rest: the
    first row, the dense model); None: that run failed."""
    first = next(iter(rates))
    lines = [f"| {title} | {unit} | time vs dense |", "|---|---:|---:|"]
    for name, rate in rates.items():
        base = rates.get((baselines or {}).get(name, first))
        ratio = f"{base / rate:.2f}x" if base and rate else "-"
        lines.append(f"| {name} | {f'{rate:,.0f}' if rate else 'failed'} | {ratio} |")
    return lines + [""]


def main() -> int:
    on_gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paper", action="store_true", default=on_gpu,
                        help="the paper's SLM expert shape (default on GPU)")
    parser.add_argument("--tiny", action="store_true",
                        help="a tiny shape (d 64, 2 layers): a smoke run of the benchmark")
    parser.add_argument("--steps", type=int, default=30 if on_gpu else 8)
    parser.add_argument("--warmup", type=int, default=10 if on_gpu else 3)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repetitions")
    parser.add_argument("--only", choices=("step", "validation", "mlp"), action="append",
                        help="run only these measurements (repeatable; default: all)")
    parser.add_argument("--runs", choices=STEP_RUNS, nargs="+",
                        help="the step measurement's rows (default: all; dense first)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"),
                        default="bfloat16" if on_gpu else "float32",
                        help="the mlp measurement's dtype (default: bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--results", default=str(REPO / "benchmarks" / "RESULTS.md"))
    args = parser.parse_args()
    only = set(args.only or ("step", "validation", "mlp"))
    args.paper = args.paper and not args.tiny
    shape, vocab = (TINY, 512) if args.tiny else ([], 32000) if args.paper else (REDUCED, 8192)

    lines = [f"Device: {device_description()}; date {datetime.date.today()}; "
             f"{'paper expert shape (d 1024, 7 layers)' if args.paper else ' '.join(shape)}; "
             f"k=32 h=23 m=16; best of {args.rounds} interleaved rounds; "
             f"{torch.get_num_threads()} torch threads per process.", ""]
    rates = {}
    if "step" in only:
        with tempfile.TemporaryDirectory() as tmp:
            rates, baselines = step_times(shape, vocab, args, Path(tmp))
        lines += [f"Training step (median of steps {args.warmup + 1}-{args.steps}):", ""]
        lines += ratio_table("pn-train", rates, baselines=baselines)
    if "validation" in only:
        lines += ["Validation / evaluation (forward only, no grad):", ""]
        lines += ratio_table("forward", validation_rates(shape, args))
    if "mlp" in only:
        rows = mlp_alternatives(args)
        base = next(iter(rows.values()))
        b = 8 if args.paper else 4
        lines += [f"One MLP, {b} rows of {b} experts, {args.dtype} (ms per call):", "",
                  "| variant | fwd+bwd ms | vs dense | no-grad fwd ms | vs dense |",
                  "|---|---:|---:|---:|---:|"]
        lines += [f"| {name} | {t:.1f} | {t / base[0]:.2f}x | {i:.1f} | {i / base[1]:.2f}x |"
                  for name, (t, i) in rows.items()]
    report = "\n".join(lines).rstrip()
    print(report)
    write_section(Path(args.results), report, SECTION, "`benchmarks/pn_overhead.py`.")
    return 1 if None in rates.values() else 0


if __name__ == "__main__":
    sys.exit(main())
