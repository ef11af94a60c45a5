"""LoRA (finetune.lora): zero-initialized adapters compute the base model, merging is exact to
fp32 rounding, adapter checkpoints hold the adapters and name their base, peft loads the
exported adapters onto the exported base with our logits, TP2 / sequence parallelism / the
distributed optimizer reproduce the one-process fine-tuning, a stopped run resumes bit for bit,
and the fine-tuning's selection (step-0 candidate, keep-best) works as without adapters.
In-process (a gloo world of one) except the training runs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from megatron.core import dist_checkpointing
from torch.distributed.checkpoint import FileSystemReader

from helpers import (REPO, free_port, losses, perturbed_model, read_metrics, real_text_documents,
                     run_train, tiny_overrides, train_env, write_byte_dataset,
                     write_model_checkpoint)
from megatron_pn import checkpoint, lora
from megatron_pn.checkpoint_tools import inference_world, load_model
from megatron_pn.cli.hf import export_main
from megatron_pn.cli.merge_lora import main as merge_main
from megatron_pn.config import load_config
from megatron_pn.hf import ADAPTER_DIR, write_checkpoint
from megatron_pn.model import build_gpt, transformer_config

SLM, FINETUNE = "configs/tiny/slm.yaml", "configs/finetune/tiny.yaml"
GPT2_STYLE = ("model.activation=gelu", "model.normalization=LayerNorm",
              "model.position_embedding_type=learned_absolute")
VARIANTS = {  # the shapes pn-export-hf maps: fused QKV (grouped-query), gated or plain fc1
    "llama": (),
    "llama_gqa_bias": ("model.num_query_groups=2", "model.add_bias_linear=true",
                       "model.tie_embeddings=false"),
    "gpt2": GPT2_STYLE,
    "gpt2_gqa_bias": (*GPT2_STYLE, "model.num_query_groups=2", "model.add_bias_linear=true"),
}


def config(*overrides):
    return load_config([SLM], ["model.vocab_size=257", "data.eod_id=256", *overrides])


def lora_config(variant: str, targets: str = "both", base: str = "unused"):
    return config(*VARIANTS[variant], "finetune.lora.rank=4", "finetune.lora.alpha=6",
                  f"finetune.lora.targets={targets}", f"checkpoint.load={base}")


def tokens(batch=3, seq=64, seed=0):
    return torch.randint(0, 257, (batch, seq), generator=torch.Generator().manual_seed(seed))


def logits(model, ids):
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        return model(ids, positions, None)


def assert_close(got, expected, rel):
    assert got.shape == expected.shape
    error = (got - expected).abs().max() / expected.abs().max()
    assert error <= rel, f"relative error {error:.2e}"


def adapted_model(variant: str, targets: str = "both", base: str = "unused", trained=True):
    """(base model with perturbed weights, the same with adapters: B random when `trained`)."""
    base_model = perturbed_model(config(*VARIANTS[variant]), seed=len(variant))
    cfg = lora_config(variant, targets, base)
    model = build_gpt(cfg, transformer_config(cfg, "cpu")).eval()
    missing, unexpected = model.load_state_dict(base_model.state_dict(), strict=False)
    assert not unexpected and all(lora.is_adapter(key) for key in missing)
    if trained:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for _, linear in lora.adapted_linears(model):
                linear.lora_b.copy_(0.05 * torch.randn(linear.lora_b.shape, generator=g))
    return base_model, model, cfg


def adapter_checkpoint(variant: str, tmp_path, targets: str = "both"):
    """A base checkpoint and an adapter checkpoint on it, as a LoRA fine-tuning saves them."""
    base_dir = tmp_path / "base"
    base_model, model, cfg = adapted_model(variant, targets, str(base_dir))
    write_checkpoint(base_model, config(*VARIANTS[variant]), base_dir)
    record = lora.base_record(checkpoint.resolve(base_dir))
    path = write_checkpoint(model, cfg, tmp_path / "adapters",
                            extra={checkpoint.BASE_KEY: record})
    return base_model, model, path


# -- the model ---------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["llama", "gpt2_gqa_bias"])
def test_zero_initialized_adapters_compute_the_base_model(world, variant):
    base_model, model, _ = adapted_model(variant, trained=False)
    ids = tokens()
    assert torch.equal(logits(model, ids), logits(base_model, ids))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(lora.is_adapter(name) for name in trainable)
    assert len(trainable) == 2 * 4 * model.config.num_layers  # A and B of 4 linears per layer
    linears = dict(lora.adapted_linears(model))
    first = linears["decoder.layers.0.self_attention.linear_qkv"]
    assert not first.lora_b.any() and first.lora_a.abs().min() > 0
    # seeded per layer and module: the layers' adapters differ
    assert not torch.equal(first.lora_a, linears["decoder.layers.1.self_attention.linear_qkv"]
                           .lora_a)


@pytest.mark.parametrize("targets", ["attention", "mlp"])
def test_targets_choose_the_adapted_linears(world, targets):
    _, model, _ = adapted_model("llama", targets)
    adapted = {name.rsplit(".", 1)[1] for name, _ in lora.adapted_linears(model)}
    assert adapted == set({"attention": ("linear_qkv", "linear_proj"),
                           "mlp": ("linear_fc1", "linear_fc2")}[targets])


@pytest.mark.parametrize("variant", ["llama", "gpt2_gqa_bias"])
def test_merged_checkpoint_computes_the_adapted_model(world, tmp_path, variant, capsys):
    base_model, model, adapters = adapter_checkpoint(variant, tmp_path)
    ids = tokens()
    expected = logits(model, ids)
    assert not torch.allclose(expected, logits(base_model, ids), atol=1e-3)
    # the adapter checkpoint holds the adapters alone, and loads with its base
    saved = dist_checkpointing.load_common_state_dict(str(checkpoint.resolve(adapters)))
    keys = set(FileSystemReader(str(checkpoint.resolve(adapters))).read_metadata()
               .state_dict_metadata)
    # (megatron-core stacks the layers: one key per linear of the layer)
    assert len(keys) == 2 * 4 and all(map(lora.is_adapter, keys))
    assert saved[checkpoint.BASE_KEY]["path"] == str((tmp_path / "base").resolve() /
                                                      "iter_0000000")
    with inference_world() as env:
        assert torch.equal(logits(load_model(adapters, env).model, ids), expected)
    assert merge_main(["--checkpoint", str(adapters), "--output", str(tmp_path / "merged")]) == 0
    with inference_world() as env:
        merged = load_model(tmp_path / "merged", env)
        assert not lora.has_adapters(merged.model)
        assert merged.cfg.finetune.lora.rank is None
        assert_close(logits(merged.model, ids), expected, rel=1e-6)


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_tp2_adapters_compute_the_unsharded_formula(sequence_parallel):
    """A column- then a row-parallel LoRA linear at TP2 (tests/lora_tp_check.py): output and
    every adapter gradient as unsharded, also with sequence parallelism, which no whole model
    runs on CPU (megatron-core's torch norms refuse it)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-port", str(free_port()), "tests/lora_tp_check.py",
               *(["--sequence-parallel"] if sequence_parallel else [])]
    proc = subprocess.run(command, cwd=REPO, env=train_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    errors = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(errors) == {"y", "a1", "b1", "a2", "b2"}
    assert max(errors.values()) < 1e-5, errors


def test_a_changed_base_is_refused(world, tmp_path):
    _, _, adapters = adapter_checkpoint("llama", tmp_path)
    shard = next((tmp_path / "base" / "iter_0000000").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    with inference_world() as env, pytest.raises(checkpoint.CheckpointError, match="sha256"):
        load_model(adapters, env)


# -- Hugging Face adapters -----------------------------------------------------------------------

@pytest.mark.parametrize("variant", list(VARIANTS))
def test_peft_loads_the_exported_adapters_with_our_logits(world, tmp_path, variant):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_model, model, adapters = adapter_checkpoint(variant, tmp_path)
    ids = tokens()
    assert export_main(["--checkpoint", str(adapters), "--output", str(tmp_path / "hf"),
                        "--adapter"]) == 0
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        assert_close(base(ids).logits, logits(base_model, ids), rel=1e-4)
        peft = PeftModel.from_pretrained(base, tmp_path / "hf" / ADAPTER_DIR).eval()
        assert_close(peft(ids).logits, logits(model, ids), rel=1e-4)
    config = json.loads((tmp_path / "hf" / ADAPTER_DIR / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 6
    assert config["base_model_name_or_path"] == str((tmp_path / "hf").resolve())
    # merged into the weights instead (no --adapter): the same logits in plain transformers
    assert export_main(["--checkpoint", str(adapters), "--output", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    with torch.no_grad():
        assert_close(merged.eval()(ids).logits, logits(model, ids), rel=1e-4)


# -- fine-tuning with adapters ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_byte_dataset(tmp_path_factory.mktemp("lora_data") / "text", real_text_documents())


@pytest.fixture(scope="module")
def base(dataset, tmp_path_factory):
    """The dense model the adapters fine-tune (initialized weights)."""
    path = tmp_path_factory.mktemp("lora_base") / "ckpt"
    return write_model_checkpoint(path, [SLM], tiny_overrides(dataset, path.parent))


def finetune(run, dataset, base, *configs, nproc=1, **extra):
    run_train([SLM, *configs, *tiny_overrides(dataset, run, **{
        "checkpoint.load": base, "checkpoint.dir": run / "ckpt", "finetune.lora.rank": 4,
        "train.steps": 6, **extra})], nproc=nproc)
    return run


def saved_keys(run, step: int) -> set[str]:
    path = checkpoint.iteration_dir(run / "ckpt", step)
    return set(FileSystemReader(str(path)).read_metadata().state_dict_metadata)


@pytest.fixture(scope="module")
def single(dataset, base, tmp_path_factory):
    return finetune(tmp_path_factory.mktemp("lora_single") / "run", dataset, base)


@pytest.mark.slow
@pytest.mark.parametrize("name,nproc,extra", [
    ("tp2", 2, {"parallel.tensor": 2}),
    ("pp2", 2, {"parallel.pipeline": 2}),
    ("dp2_distributed_optimizer", 2, {"parallel.distributed_optimizer": "true"}),
])
def test_layouts_reproduce_the_single_process_fine_tuning(dataset, base, single, tmp_path, name,
                                                          nproc, extra):
    """Adapters split like their weights: the same loss curve; the checkpoint of any layout
    holds adapters only (the distributed optimizer's state too) and loads at TP1 as the same
    model."""
    run = finetune(tmp_path / name, dataset, base, nproc=nproc, **extra)
    expected = losses(single)
    assert expected[-1] < expected[0]  # the adapters trained
    assert losses(run) == pytest.approx(expected, rel=1e-5)
    keys = saved_keys(run, 6)
    model_keys = {k for k in keys if k.startswith("decoder.") or k.startswith("embedding.")}
    assert model_keys and all(map(lora.is_adapter, model_keys))
    assert all("lora_" in k for k in keys if k.startswith("optimizer."))
    ids = tokens()
    with inference_world() as env:
        assert_close(logits(load_model(run / "ckpt", env).model, ids),
                     logits(load_model(single / "ckpt", env).model, ids), rel=1e-5)


@pytest.mark.slow
def test_a_stopped_run_resumes_bit_exact_with_its_selection(dataset, base, tmp_path):
    """Validation, keep-best and early stopping as in full fine-tuning; a run stopped between
    evaluations resumes from its adapters, optimizer and selection state to the same losses,
    validations and kept step as an uninterrupted one (DP2, the adapters' Adam states sharded
    by the distributed optimizer). The base is never written."""
    options = {"train.steps": 8, "train.eval_interval": 2, "train.valid_tokens": 2048,
               "data.split": "90,10,0", "train.log_interval": 1,
               "parallel.distributed_optimizer": "true"}
    before = lora.fingerprint(checkpoint.resolve(base))
    whole = finetune(tmp_path / "whole", dataset, base, FINETUNE, nproc=2, **options)
    stopped = finetune(tmp_path / "stopped", dataset, base, FINETUNE, nproc=2, **options,
                       **{"train.exit_after_steps": 3})
    assert max(read_metrics(stopped)) == 3
    finetune(tmp_path / "stopped", dataset, base, FINETUNE, nproc=2, **options)
    assert losses(stopped) == losses(whole) and len(losses(whole)) == 8
    assert read_metrics(stopped, "valid") == read_metrics(whole, "valid")
    finished = json.loads((whole / "finished.json").read_text())
    assert json.loads((stopped / "finished.json").read_text()) == finished
    assert sorted(read_metrics(whole, "valid")) == [0, 2, 4, 6, 8] and finished["best_step"] > 0
    assert lora.fingerprint(checkpoint.resolve(base)) == before


@pytest.mark.slow
def test_the_starting_model_is_kept_when_the_adapters_do_not_help(dataset, base, tmp_path):
    """The step-0 candidate with LoRA: at a negligible learning rate no evaluation beats the
    starting model by the margin (0.01 nats), early stopping ends the run, and the kept
    checkpoint (zero B) evaluates exactly as the base."""
    run = finetune(tmp_path / "run", dataset, base, FINETUNE, **{
        "train.steps": 20, "train.eval_interval": 2, "train.valid_tokens": 2048,
        "data.split": "90,10,0", "train.lr_factor_of_loaded": 1e-9,
        "train.selection_margin": 0.01})
    finished = json.loads((run / "finished.json").read_text())
    assert finished["best_step"] == 0 and finished["reason"] == "early stopping"
    assert checkpoint.resolve(run / "ckpt").name == "iter_0000000"
    ids = tokens()
    with inference_world() as env:
        assert torch.equal(logits(load_model(run / "ckpt", env).model, ids),
                           logits(load_model(base, env).model, ids))


def test_lora_flops_count_the_frozen_weights_without_their_weight_gradient():
    """MFU's numerator with adapters: 4 x the frozen matmul weights (forward and input
    gradient), 6 x the adapters' r (in + out), attention as before."""
    from megatron_pn.model import flops_per_token

    dense, adapted = config(), config("finetune.lora.rank=4", "checkpoint.load=unused")
    d, f, layers, vocab, s = 64, 176, 4, 384, 64  # configs/tiny/slm.yaml, vocabulary padded
    weights = layers * (4 * d * d + 3 * d * f) + d * vocab
    adapters = layers * 4 * ((d + 3 * d) + (d + d) + (d + 2 * f) + (f + d))
    attention = 6 * layers * s * d
    assert flops_per_token(dense) == 6 * weights + attention
    assert flops_per_token(adapted) == 4 * weights + 6 * adapters + attention

