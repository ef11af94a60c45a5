"""pn-export-hf / pn-import-hf: Hugging Face logits equal the Megatron forward (Llama-style,
GPT-2-style, untied, grouped-query, biased, a PN expert), import after export is the identity,
offline loading and generation, a TP=2 checkpoint exports like a TP=1 one, pn-train starts from
an imported checkpoint, bad input. In-process (a gloo world of one) except the training runs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from helpers import perturbed_model as build
from helpers import (read_metrics, real_text_documents, run_train, tiny_overrides,
                     train_env, write_byte_dataset)
from megatron_pn.config import load_config
from megatron_pn.cli.hf import export_main, import_main
from megatron_pn.hf import write_checkpoint

SLM, PN = "configs/tiny/slm.yaml", "configs/tiny/pn.yaml"
GPT2_STYLE = ("model.activation=gelu", "model.normalization=LayerNorm",
              "model.position_embedding_type=learned_absolute")
VARIANTS = {
    "llama": (),
    "llama_untied_gqa_bias_theta": ("model.tie_embeddings=false", "model.num_query_groups=2",
                                    "model.add_bias_linear=true", "model.rotary_base=5000"),
    "gpt2": GPT2_STYLE,
    "gpt2_untied_gqa_bias": (*GPT2_STYLE, "model.tie_embeddings=false",
                             "model.num_query_groups=2", "model.add_bias_linear=true"),
}


def config(path=SLM, *overrides, vocab=257):
    return load_config([path], [f"model.vocab_size={vocab}", "data.eod_id=256", *overrides])


def tokens(batch=3, seq=64, vocab=257, seed=0):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def megatron_logits(model, ids, **routing):
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        return model(ids, positions, None, **routing)


def hf_logits(directory, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def assert_close(got, expected, rel=1e-4):
    assert got.shape == expected.shape
    error = (got - expected).abs().max() / expected.abs().max()
    assert error <= rel, f"relative error {error:.2e}"


def export(args):
    assert export_main([str(a) for a in args]) == 0


def import_(args):
    assert import_main([str(a) for a in args]) == 0


def loaded_state(path):
    """The weights of a checkpoint loaded into this process (TP=1), without extra state."""
    from megatron_pn.checkpoint_tools import inference_world, load_model

    with inference_world() as env:
        model = load_model(path, env).model
    return {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


def assert_same_state(got: dict, expected: dict):
    expected = {k: v for k, v in expected.items() if not k.endswith("_extra_state")}
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_export_matches_megatron_and_import_is_the_identity(world, tmp_path, variant):
    from megatron_pn.checkpoint import saved_config

    cfg = config(SLM, *VARIANTS[variant])
    model = build(cfg, seed=len(variant))
    ckpt = write_checkpoint(model, cfg, tmp_path / "ckpt")
    export(["--checkpoint", ckpt, "--output", tmp_path / "hf"])
    ids = tokens()
    assert_close(hf_logits(tmp_path / "hf", ids), megatron_logits(model, ids))

    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_config["vocab_size"] == 384 and hf_config["eos_token_id"] == 256
    assert hf_config["tie_word_embeddings"] == cfg.model.tie_embeddings
    if variant.startswith("llama"):
        assert hf_config["architectures"] == ["LlamaForCausalLM"]
        assert hf_config["rope_theta"] == cfg.model.rotary_base
        assert hf_config["rms_norm_eps"] == cfg.model.norm_epsilon
        assert hf_config["num_key_value_heads"] == (cfg.model.num_query_groups or 4)
    else:
        assert hf_config["architectures"] == ["GPT2LMHeadModel"]

    import_(["--hf", tmp_path / "hf", "--output", tmp_path / "back"])
    assert_same_state(loaded_state(tmp_path / "back"), model.state_dict())
    assert saved_config(tmp_path / "back").model == cfg.model


def test_pn_expert_exports_as_its_dense_model(world, tmp_path):
    from megatron_pn.pn.projection import dense_state_dict

    cfg = config(PN, "model.num_experts=4", "model.bank_size=3", "model.code_size=2")
    model = build(cfg, seed=7)
    ckpt = write_checkpoint(model, cfg, tmp_path / "ckpt")
    export(["--checkpoint", ckpt, "--expert", 1, "--output", tmp_path / "hf"])
    ids = tokens()
    expected = megatron_logits(model, ids, cluster_ids=torch.ones(len(ids), dtype=torch.long))
    assert_close(hf_logits(tmp_path / "hf", ids), expected)
    import_(["--hf", tmp_path / "hf", "--output", tmp_path / "back"])
    assert_same_state(loaded_state(tmp_path / "back"), dense_state_dict(model, 1))


def hf_made_models():
    """Models made with transformers itself (not by the exporter): an odd vocabulary, GQA with
    attention biases only, GPT-2 with biases and untied output."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rope_theta=20000.0, attention_bias=True, mlp_bias=False, tie_word_embeddings=False))
    gpt2 = GPT2LMHeadModel(GPT2Config(
        vocab_size=300, n_embd=64, n_layer=2, n_head=4, n_positions=64, n_inner=128,
        activation_function="gelu", tie_word_embeddings=False))
    return {"llama": llama, "gpt2": gpt2}


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_import_of_a_transformers_model_computes_the_same_logits(world, tmp_path, name):
    from megatron_pn.checkpoint_tools import inference_world, load_model

    model = hf_made_models()[name].eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    model.save_pretrained(tmp_path / "hf")
    import_(["--hf", tmp_path / "hf", "--output", tmp_path / "ckpt"])
    ids = tokens(vocab=300)
    with inference_world() as env:
        megatron = load_model(tmp_path / "ckpt", env).model
    with torch.no_grad():
        expected = model(ids).logits
    assert_close(megatron_logits(megatron, ids), expected)


def test_bf16_export(world, tmp_path):
    from safetensors import safe_open

    cfg = config()
    ckpt = write_checkpoint(build(cfg), cfg, tmp_path / "ckpt")
    export(["--checkpoint", ckpt, "--output", tmp_path / "hf", "--dtype", "bf16"])
    with safe_open(tmp_path / "hf" / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A SentencePiece/HF tokenizer of 500 pieces from `pn-data train-tokenizer`."""
    from data_tools.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("tokenizer")
    corpus = root / "text.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in real_text_documents(50_000)))
    train_tokenizer([str(corpus)], str(root / "tok"), vocab_size=500, threads=1)
    return root / "tok_hf"


OFFLINE_GENERATE = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
ids = tokenizer("The quick brown fox", return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
print(out.shape[1] - ids.shape[1], repr(tokenizer.decode(out[0])))
"""


def test_exported_model_loads_and_generates_offline(world, tmp_path, tokenizer):
    cfg = load_config([SLM], ["model.vocab_size=500", "data.eod_id=2"])
    ckpt = write_checkpoint(build(cfg), cfg, tmp_path / "ckpt")
    export(["--checkpoint", ckpt, "--output", tmp_path / "hf", "--tokenizer", tokenizer])
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    env = train_env({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    proc = subprocess.run([sys.executable, "-c", OFFLINE_GENERATE, str(tmp_path / "hf")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[0] == "6"


# -- bad input ----------------------------------------------------------------------------------

def export_error(args, capsys) -> str:
    assert export_main([str(a) for a in args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_export_errors(world, tmp_path, tokenizer, capsys):
    pn_cfg = config(PN, "model.num_experts=4", "model.bank_size=3", "model.code_size=2")
    pn_ckpt = write_checkpoint(build(pn_cfg), pn_cfg, tmp_path / "pn")
    err = export_error(["--checkpoint", pn_ckpt, "--output", tmp_path / "o"], capsys)
    assert "is a PN checkpoint (4 experts): pass --expert I" in err
    err = export_error(["--checkpoint", pn_ckpt, "--output", tmp_path / "o", "--expert", 9],
                       capsys)
    assert "--expert 9 is outside" in err

    odd = config(SLM, "model.normalization=LayerNorm")  # SwiGLU + LayerNorm: no HF twin
    odd_ckpt = write_checkpoint(build(odd), odd, tmp_path / "odd")
    err = export_error(["--checkpoint", odd_ckpt, "--output", tmp_path / "o"], capsys)
    assert "no Hugging Face architecture fits" in err

    cfg = config()
    ckpt = write_checkpoint(build(cfg), cfg, tmp_path / "dense")
    err = export_error(["--checkpoint", ckpt, "--output", tmp_path / "o", "--tokenizer",
                        tokenizer], capsys)
    assert "tokenizer/vocabulary mismatch" in err  # 500 pieces, EOS 2 vs 384 ids, EOD 256
    err = export_error(["--checkpoint", tmp_path / "missing", "--output", tmp_path / "o"], capsys)
    assert "does not exist" in err
    (tmp_path / "taken").mkdir()
    err = export_error(["--checkpoint", ckpt, "--output", tmp_path / "taken"], capsys)
    assert "--overwrite" in err
    assert not (tmp_path / "o").exists()


def test_import_errors(world, tmp_path, capsys):
    assert import_main(["--hf", str(tmp_path), "--output", str(tmp_path / "o")]) == 2
    assert "no config.json there" in capsys.readouterr().err


# -- checkpoints from training runs (subprocesses) ----------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny SLM trained one step at TP=1 and at TP=2 (same seed and data)."""
    root = tmp_path_factory.mktemp("hf_train")
    prefix = write_byte_dataset(root / "text", [d[:2000] for d in real_text_documents(80_000)])
    runs = {}
    for name, nproc in (("tp1", 1), ("tp2", 2)):
        run_train([SLM, *tiny_overrides(prefix, root / name, **{
            "train.steps": 1, "parallel.tensor": nproc, "checkpoint.dir": root / name / "ckpt"})],
            nproc=nproc)
        runs[name] = root / name / "ckpt"
    return prefix, runs


@pytest.mark.slow
def test_tp2_checkpoint_exports_like_tp1(world, trained, tmp_path):
    _, runs = trained
    ids = tokens()
    logits = {}
    for name, ckpt in runs.items():
        export(["--checkpoint", ckpt, "--output", tmp_path / name])
        logits[name] = hf_logits(tmp_path / name, ids)
    assert_close(logits["tp2"], logits["tp1"])


@pytest.mark.slow
def test_pn_train_starts_from_an_imported_checkpoint(world, trained, tmp_path):
    prefix, runs = trained
    export(["--checkpoint", runs["tp1"], "--output", tmp_path / "hf"])
    import_(["--hf", tmp_path / "hf", "--output", tmp_path / "imported", "--config", SLM])
    first_loss = {}
    for name, load, files in (("original", runs["tp1"], [SLM]),
                              ("imported", tmp_path / "imported",
                               [SLM, tmp_path / "imported" / "model.yaml"])):
        proc = run_train([*map(str, files), *tiny_overrides(prefix, tmp_path / name, **{
            "train.steps": 1, "checkpoint.load": load})])
        assert "initialized model weights from" in proc.stdout
        first_loss[name] = read_metrics(tmp_path / name)[1]["loss"]
    assert first_loss["imported"] == first_loss["original"]
