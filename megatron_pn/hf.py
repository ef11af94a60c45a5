"""`pn-export-hf` and `pn-import-hf`: megatron-pn checkpoints <-> Hugging Face causal LMs.

    pn-export-hf --checkpoint runs/slm/ckpt --output hf/slm --tokenizer tok/spm_hf
    pn-export-hf --checkpoint runs/pn/ckpt --expert 3 --output hf/pn_e3      # a projected expert
    pn-import-hf --hf hf/slm --output ckpt/slm_imported --config configs/paper/slm.yaml

Architectures. A Llama-style model (SwiGLU, RMSNorm, RoPE) is a `LlamaForCausalLM`; a GPT-2-style
one (GELU, LayerNorm, learned positions) a `GPT2LMHeadModel` (zero biases where the model has
none; grouped-query K/V heads repeated, since GPT-2 has none). The vocabulary is the padded one.
The weights are renamed by the explicit tables below; two Megatron tensors are fused:

  linear_qkv  [g0: q heads, k, v | g1: q heads, k, v | ...] rows, one block per query group
              (megatron-core's attention.get_query_key_value_tensors) <-> q_proj, k_proj, v_proj
  linear_fc1  [gate; up] rows (SwiGLU)                                <-> gate_proj, up_proj

GPT-2's Conv1D weights are stored [in, out]: transposed. Every tensor's shape is checked against
the target model. The megatron-pn model config travels in config.json ("megatron_pn"), so that
import restores what HF cannot express (unpadded vocabulary, GPT-2 grouped-query heads), and
so does the checkpoint's tokenizer fingerprint ("tokenizer": sha256 of the SentencePiece .model,
pn_base/tokenizer_identity.py): `--tokenizer` must be that tokenizer (`--allow-tokenizer-mismatch`
for the deliberate exception), and import records it in the checkpoint it writes.

Import writes a model-only checkpoint in pn-train's layout (dist_checkpointing `iter_0000000/`,
`latest_checkpointed_iteration.txt`, the run config inside) plus `model.yaml`, the model section
to train with: `pn-train CONFIG.yaml CKPT_DIR/model.yaml checkpoint.load=CKPT_DIR`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import sys
from pathlib import Path

import torch
import yaml

from megatron_pn.checkpoint_tools import (ToolError, inference_world, load_model,
                                    resolve_checkpoint)
from megatron_pn.evaluate import check_expert, model_eod_id
from megatron_pn.families import one_hot
from pn_base.fileio import atomic_path, atomic_write_text, check_writable
from pn_base.tokenizer_identity import hf_model_fingerprint, hf_tokenizer_fingerprint, require_same

LLAMA, GPT2 = "llama", "gpt2"
EXTRAS_KEY = "megatron_pn"
ADAPTER_DIR = "adapter"  # pn-export-hf --adapter: the peft adapter, inside the exported base

# -- name tables: Megatron (TP=1, one stage) -> Hugging Face --------------------------------------

LLAMA_NAMES = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}
LLAMA_LAYER_NAMES = {  # decoder.layers.{i}.X -> model.layers.{i}.Y
    "input_layernorm.weight": "input_layernorm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "self_attention.linear_proj.bias": "self_attn.o_proj.bias",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
    "mlp.linear_fc2.bias": "mlp.down_proj.bias",
}
LLAMA_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
LLAMA_FC1 = ("mlp.gate_proj", "mlp.up_proj")

GPT2_NAMES = {
    "embedding.word_embeddings.weight": "transformer.wte.weight",
    "embedding.position_embeddings.weight": "transformer.wpe.weight",
    "decoder.final_layernorm.weight": "transformer.ln_f.weight",
    "decoder.final_layernorm.bias": "transformer.ln_f.bias",
    "output_layer.weight": "lm_head.weight",
}
GPT2_LAYER_NAMES = {  # decoder.layers.{i}.X -> transformer.h.{i}.Y
    "input_layernorm.weight": "ln_1.weight",
    "input_layernorm.bias": "ln_1.bias",
    "pre_mlp_layernorm.weight": "ln_2.weight",
    "pre_mlp_layernorm.bias": "ln_2.bias",
    "self_attention.linear_proj.weight": "attn.c_proj.weight",
    "self_attention.linear_proj.bias": "attn.c_proj.bias",
    "mlp.linear_fc1.weight": "mlp.c_fc.weight",
    "mlp.linear_fc1.bias": "mlp.c_fc.bias",
    "mlp.linear_fc2.weight": "mlp.c_proj.weight",
    "mlp.linear_fc2.bias": "mlp.c_proj.bias",
}
GPT2_QKV = "attn.c_attn"  # one Conv1D: [q (all heads); k; v] columns

# LoRA adapters: each adapted Megatron linear -> the Hugging Face modules its weight becomes
LLAMA_ADAPTED = {"linear_qkv": LLAMA_QKV, "linear_proj": ("self_attn.o_proj",),
                 "linear_fc1": LLAMA_FC1, "linear_fc2": ("mlp.down_proj",)}
GPT2_ADAPTED = {"linear_qkv": (GPT2_QKV,), "linear_proj": ("attn.c_proj",),
                "linear_fc1": ("mlp.c_fc",), "linear_fc2": ("mlp.c_proj",)}
GPT2_LINEAR_BIASES = ("attn.c_attn.bias", "attn.c_proj.bias", "mlp.c_fc.bias", "mlp.c_proj.bias")


def architecture(m) -> str:
    """The Hugging Face architecture that computes exactly what this model config does."""
    shape = (m.activation, m.normalization, m.position_embedding_type)
    if shape == ("swiglu", "RMSNorm", "rope"):
        return LLAMA
    if shape == ("gelu", "LayerNorm", "learned_absolute"):
        return GPT2
    raise ToolError(
        f"no Hugging Face architecture fits model.activation={m.activation}, normalization="
        f"{m.normalization}, position_embedding_type={m.position_embedding_type}; supported: "
        "swiglu+RMSNorm+rope (LlamaForCausalLM), gelu+LayerNorm+learned_absolute (GPT2LMHeadModel)")


# -- the fused tensors --------------------------------------------------------------------------

def _heads(m) -> tuple[int, int, int]:
    heads = m.num_attention_heads
    return heads, m.num_query_groups or heads, m.hidden_size // heads


def split_qkv(fused: torch.Tensor, m) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Megatron's per-group [q heads; k; v] rows -> q [heads*hn], k, v [groups*hn] (+ in dims)."""
    heads, groups, hn = _heads(m)
    rest = fused.shape[1:]
    blocks = fused.reshape(groups, (heads // groups + 2) * hn, *rest)
    q, k, v = blocks.split([heads // groups * hn, hn, hn], dim=1)
    kv_rows = groups * hn
    return q.reshape(heads * hn, *rest), k.reshape(kv_rows, *rest), v.reshape(kv_rows, *rest)


def join_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m) -> torch.Tensor:
    heads, groups, hn = _heads(m)
    rest = q.shape[1:]
    blocks = [q.reshape(groups, heads // groups * hn, *rest), k.reshape(groups, hn, *rest),
              v.reshape(groups, hn, *rest)]
    return torch.cat(blocks, dim=1).reshape(-1, *rest)


def repeat_kv(kv: torch.Tensor, m) -> torch.Tensor:
    """K or V of each query group repeated for each of its heads (GPT-2 has no GQA)."""
    heads, groups, hn = _heads(m)
    rest = kv.shape[1:]
    per_group = kv.reshape(groups, 1, hn, *rest).expand(groups, heads // groups, hn, *rest)
    return per_group.reshape(heads * hn, *rest)


def unrepeat_kv(kv: torch.Tensor, m) -> torch.Tensor:
    heads, groups, hn = _heads(m)
    per_group = kv.reshape(groups, heads // groups, hn, *kv.shape[1:])
    if not torch.equal(per_group, per_group[:, :1].expand_as(per_group)):
        raise ToolError(f"the K/V heads are not repeated per query group: the model cannot have "
                        f"model.num_query_groups={groups}")
    return per_group[:, 0].reshape(groups * hn, *kv.shape[1:])


# -- Megatron state <-> Hugging Face state ------------------------------------------------------

def _bias(state: dict, key: str, rows: int) -> torch.Tensor:
    """A linear bias, zero when the model has none (GPT-2 always has them)."""
    return state[key] if key in state else torch.zeros(rows)


def to_llama(state: dict, m) -> dict:
    out = {hf: state[mg] for mg, hf in LLAMA_NAMES.items() if mg in state}
    if m.tie_embeddings:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    for i in range(m.num_layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        out.update({dst + hf: state[src + mg] for mg, hf in LLAMA_LAYER_NAMES.items()
                    if src + mg in state})
        for kind in ("weight", "bias") if m.add_bias_linear else ("weight",):
            parts = split_qkv(state[f"{src}self_attention.linear_qkv.{kind}"], m)
            out.update({f"{dst}{hf}.{kind}": t for hf, t in zip(LLAMA_QKV, parts)})
            parts = state[f"{src}mlp.linear_fc1.{kind}"].chunk(2, dim=0)
            out.update({f"{dst}{hf}.{kind}": t for hf, t in zip(LLAMA_FC1, parts)})
    return out


def from_llama(hf: dict, m) -> dict:
    out = {mg: hf[name] for mg, name in LLAMA_NAMES.items() if name in hf}
    if m.tie_embeddings:
        out.pop("output_layer.weight", None)
    for i in range(m.num_layers):
        src, dst = f"model.layers.{i}.", f"decoder.layers.{i}."
        out.update({dst + mg: hf[src + name] for mg, name in LLAMA_LAYER_NAMES.items()
                    if src + name in hf})
        q, k, v = (hf[f"{src}{name}.weight"] for name in LLAMA_QKV)
        out[f"{dst}self_attention.linear_qkv.weight"] = join_qkv(q, k, v, m)
        gate, up = (hf[f"{src}{name}.weight"] for name in LLAMA_FC1)
        out[f"{dst}mlp.linear_fc1.weight"] = torch.cat([gate, up], dim=0)
        if m.add_bias_linear:  # Megatron biases every linear; HF may bias attention or MLP only
            def bias(name, rows):
                return hf.get(f"{src}{name}.bias", torch.zeros(rows))
            d, f = m.hidden_size, m.ffn_hidden_size
            parts = [bias(name, rows) for name, rows in zip(LLAMA_QKV, _qkv_rows(m))]
            out[f"{dst}self_attention.linear_qkv.bias"] = join_qkv(*parts, m)
            out[f"{dst}self_attention.linear_proj.bias"] = bias("self_attn.o_proj", d)
            out[f"{dst}mlp.linear_fc1.bias"] = torch.cat([bias(n, f) for n in LLAMA_FC1])
            out[f"{dst}mlp.linear_fc2.bias"] = bias("mlp.down_proj", d)
    return out


def _qkv_rows(m) -> tuple[int, int, int]:
    heads, groups, hn = _heads(m)
    return heads * hn, groups * hn, groups * hn


def to_gpt2(state: dict, m) -> dict:
    out = {hf: state[mg] for mg, hf in GPT2_NAMES.items() if mg in state}
    if m.tie_embeddings:
        out["lm_head.weight"] = out["transformer.wte.weight"]
    for i in range(m.num_layers):
        src, dst = f"decoder.layers.{i}.", f"transformer.h.{i}."
        for mg, hf in GPT2_LAYER_NAMES.items():
            if mg.endswith(".bias") and "layernorm" not in mg:
                rows = state[src + mg[:-len("bias")] + "weight"].shape[0]
                out[dst + hf] = _bias(state, src + mg, rows)
            else:
                tensor = state[src + mg]
                out[dst + hf] = tensor.t() if tensor.dim() == 2 else tensor  # Conv1D: [in, out]
        for kind in ("weight", "bias"):
            key = f"{src}self_attention.linear_qkv.{kind}"
            fused = _bias(state, key, sum(_qkv_rows(m))) if kind == "bias" else state[key]
            q, k, v = split_qkv(fused, m)
            qkv = torch.cat([q, repeat_kv(k, m), repeat_kv(v, m)], dim=0)
            out[f"{dst}{GPT2_QKV}.{kind}"] = qkv.t() if kind == "weight" else qkv
    return out


def from_gpt2(hf: dict, m) -> dict:
    out = {mg: hf[name] for mg, name in GPT2_NAMES.items() if name in hf}
    if m.tie_embeddings:
        out.pop("output_layer.weight", None)
    d = m.hidden_size
    for i in range(m.num_layers):
        src, dst = f"transformer.h.{i}.", f"decoder.layers.{i}."
        for mg, name in GPT2_LAYER_NAMES.items():
            linear_bias = mg.endswith(".bias") and "layernorm" not in mg
            if linear_bias and not m.add_bias_linear:
                continue
            tensor = hf[src + name]
            out[dst + mg] = tensor.t() if tensor.dim() == 2 else tensor
        weight = hf[f"{src}{GPT2_QKV}.weight"].t()  # [3d, d]: q, k, v of every head
        kinds = {"weight": weight}
        if m.add_bias_linear:
            kinds["bias"] = hf[f"{src}{GPT2_QKV}.bias"]
        for kind, fused in kinds.items():
            q, k, v = fused.split([d, d, d], dim=0)
            out[f"{dst}self_attention.linear_qkv.{kind}"] = join_qkv(
                q, unrepeat_kv(k, m), unrepeat_kv(v, m), m)
    return out


def _gpt2_kv_repeated(hf: dict, c, groups: int) -> bool:
    """Whether every layer's K and V heads repeat per query group (a GQA model exported)."""
    heads, hn = c.n_head, c.n_embd // c.n_head
    if heads % groups:
        return False
    for i in range(c.n_layer):
        for kind in ("weight", "bias"):
            kv = hf[f"transformer.h.{i}.{GPT2_QKV}.{kind}"][..., c.n_embd:]  # [k | v] columns
            per_group = kv.reshape(*kv.shape[:-1], 2, groups, heads // groups, hn)
            if not torch.equal(per_group, per_group[..., :1, :].expand_as(per_group)):
                return False
    return True


def _gpt2_has_linear_biases(hf: dict, num_layers: int) -> bool:
    return any(hf[f"transformer.h.{i}.{name}"].any()
               for i in range(num_layers) for name in GPT2_LINEAR_BIASES)


def check_shapes(got: dict, expected: dict, what: str) -> None:
    """The converted tensors are exactly the target model's: same names, same shapes."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    if missing or unexpected:
        raise ToolError(f"{what}: name mapping incomplete: missing {missing[:4]}, "
                        f"unexpected {unexpected[:4]}")
    for key, tensor in got.items():
        if key.endswith("_extra_state"):  # megatron-core's (empty) per-layer extra state
            continue
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ToolError(f"{what}: {key} has shape {tuple(tensor.shape)}, the model expects "
                            f"{tuple(expected[key].shape)}")


# -- export -------------------------------------------------------------------------------------

def megatron_dense_state(loaded, expert: int | None) -> dict:
    """The full (TP=1) state of the dense model: the checkpoint's, or that of expert (cluster)
    `expert` of a routed model (a PN's projected expert); LoRA adapters merged in."""
    weights = None if expert is None else one_hot(expert, loaded.cfg.model.num_experts)
    return host_weights(loaded.family.dense_state(loaded.model, weights))


def host_weights(state: dict) -> dict:
    return {k: v.detach().cpu().float() for k, v in state.items()
            if not k.endswith("_extra_state")}


def hf_adapters(factors: dict, m) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Megatron adapters (TP=1; module name -> (A, B)) as the Hugging Face modules' (A, B)."""
    llama = architecture(m) == LLAMA
    out = {}
    for name, (a, b) in factors.items():
        _, _, layer, _, linear = name.split(".")  # decoder.layers.I.self_attention.linear_qkv
        a, b = a.cpu().float(), b.cpu().float()
        pieces = (b,)
        if linear == "linear_qkv":
            q, k, v = split_qkv(b, m)
            pieces = (q, k, v) if llama else (torch.cat([q, repeat_kv(k, m), repeat_kv(v, m)]),)
        elif linear == "linear_fc1" and llama:
            pieces = b.chunk(2, dim=0)  # [gate; up]
        prefix = f"model.layers.{layer}." if llama else f"transformer.h.{layer}."
        names = (LLAMA_ADAPTED if llama else GPT2_ADAPTED)[linear]
        out.update({prefix + hf: (a, piece.contiguous()) for hf, piece in zip(names, pieces)})
    return out


def peft_model(hf_model, adapters: dict, lora, m, base_path: Path):
    """The exported base wrapped by peft with these adapters (module name -> (A, B))."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    targets = sorted({name.split(".", 3)[3] for name in adapters})  # e.g. self_attn.q_proj
    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=targets, fan_in_fan_out=architecture(m) == GPT2,
                        bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(hf_model, config)
    # (peft takes the base's name from the model, which has none: it was built, not loaded)
    model.peft_config["default"].base_model_name_or_path = str(base_path.resolve())
    inner = model.base_model.model
    wrapped = {name for name, module in inner.named_modules() if isinstance(module, LoraLayer)}
    if wrapped != set(adapters):
        raise ToolError(f"peft put adapters on {sorted(wrapped - set(adapters))[:3]} and not on "
                        f"{sorted(set(adapters) - wrapped)[:3]}: the adapters cannot be exported")
    with torch.no_grad():
        for name, (a, b) in adapters.items():
            module = inner.get_submodule(name)
            module.lora_A["default"].weight.copy_(a)
            module.lora_B["default"].weight.copy_(b)
    return model.eval()


def special_token_ids(eod: int, tokenizer_dir: str | None, vocab: int) -> dict:
    """bos/eos/pad ids for config.json; the tokenizer, when given, must fit the model."""
    if tokenizer_dir is None:
        return {"bos_token_id": None, "eos_token_id": eod, "pad_token_id": None}
    from transformers import AutoTokenizer

    if not Path(tokenizer_dir).is_dir():
        raise ToolError(f"--tokenizer {tokenizer_dir} is not a directory (the PREFIX_hf/ of "
                        "`pn-data train-tokenizer`)")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if len(tokenizer) > vocab or tokenizer.eos_token_id != eod:
        raise ToolError(f"tokenizer/vocabulary mismatch: {tokenizer_dir} has {len(tokenizer)} "
                        f"tokens and EOS id {tokenizer.eos_token_id}; the model has {vocab} ids "
                        f"and EOD id {eod}")
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": eod,
            "pad_token_id": tokenizer.pad_token_id}


def hf_config(m, ids: dict, extras: dict):
    from transformers import GPT2Config, LlamaConfig

    from megatron_pn.model import padded_vocab_size

    common = dict(vocab_size=padded_vocab_size(m), tie_word_embeddings=m.tie_embeddings,
                  initializer_range=m.init_method_std, **ids, **{EXTRAS_KEY: extras})
    heads, groups, hn = _heads(m)
    if architecture(m) == LLAMA:
        return LlamaConfig(
            hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
            num_hidden_layers=m.num_layers, num_attention_heads=heads,
            num_key_value_heads=groups, head_dim=hn, hidden_act="silu",
            max_position_embeddings=m.seq_length, rms_norm_eps=m.norm_epsilon,
            rope_theta=float(m.rotary_base), attention_bias=m.add_bias_linear,
            mlp_bias=m.add_bias_linear, attention_dropout=m.attention_dropout, **common)
    return GPT2Config(
        n_embd=m.hidden_size, n_layer=m.num_layers, n_head=heads, n_inner=m.ffn_hidden_size,
        n_positions=m.seq_length, activation_function="gelu",  # exact (erf) GELU, as F.gelu
        layer_norm_epsilon=m.norm_epsilon, resid_pdrop=m.hidden_dropout,
        embd_pdrop=m.hidden_dropout, attn_pdrop=m.attention_dropout, **common)


def build_hf_model(m, state: dict, ids: dict, extras: dict):
    """The Hugging Face model holding a dense Megatron state (fp32)."""
    from transformers import GPT2LMHeadModel, LlamaForCausalLM

    arch = architecture(m)
    config = hf_config(m, ids, extras)
    model = (LlamaForCausalLM if arch == LLAMA else GPT2LMHeadModel)(config)
    converted = (to_llama if arch == LLAMA else to_gpt2)(state, m)
    converted = {k: v.contiguous() for k, v in converted.items()}
    check_shapes(converted, model.state_dict(), "export")
    model.load_state_dict(converted, strict=True)
    return model.eval()


def write_hf_dir(model, directory: Path, dtype: str, tokenizer_dir: str | None) -> None:
    model.to({"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
    model.save_pretrained(directory)
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    rope = config.get("rope_parameters") or {}
    if "rope_theta" in rope:  # also where transformers < 5 and other readers look for it
        config["rope_theta"] = rope["rope_theta"]
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if tokenizer_dir:
        for item in Path(tokenizer_dir).iterdir():
            if item.is_file():
                shutil.copy2(item, directory / item.name)


def export(checkpoint: str, output: str, expert: int | None = None,
           tokenizer: str | None = None, dtype: str = "fp32", overwrite: bool = False,
           allow_tokenizer_mismatch: bool = False, adapter: bool = False) -> Path:
    """Write checkpoint (or PN expert) as a Hugging Face model directory; returns it. `adapter`:
    an adapter checkpoint's base there and its LoRA adapters as peft's in OUTPUT/adapter."""
    from megatron_pn.checkpoint import saved_config
    from megatron_pn.run_tokenizer import checkpoint_fingerprint
    from megatron_pn.families import family_of
    from megatron_pn.model import padded_vocab_size

    check_writable(output, overwrite)
    out = Path(output)
    if out.is_dir() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise ToolError(f"--output {output} holds files that are not a Hugging Face model "
                        "(no config.json): --overwrite replaces only an earlier export; give a "
                        "new or empty directory")
    path = resolve_checkpoint(checkpoint)
    saved = saved_config(path)
    m = family_of(saved).dense_config(saved.model)
    architecture(m)  # fail before loading any weight
    check_expert(saved.model, expert, checkpoint, "export the dense model of expert I")
    if adapter and saved.finetune.lora.rank is None:
        raise ToolError(f"--adapter: {path} holds no LoRA adapters (finetune.lora); export it "
                        "without --adapter")
    trained = checkpoint_fingerprint(path)
    if tokenizer:
        require_same(hf_tokenizer_fingerprint(tokenizer), trained,
                     allow=allow_tokenizer_mismatch,
                     fix="copy in the tokenizer the checkpoint was trained with (--tokenizer)")
    with inference_world(single_process=True) as env:
        loaded = load_model(checkpoint, env, "fp32")
        if adapter:
            from megatron_pn.lora import adapter_factors, base_state

            state, factors = host_weights(base_state(loaded.model)), adapter_factors(loaded.model)
        else:
            state = megatron_dense_state(loaded, expert)
    source = {"checkpoint": str(loaded.path), "iteration": loaded.iteration,
              "model_type": saved.model.type, "expert": expert, "lora_adapter": adapter}
    ids = special_token_ids(model_eod_id(saved), tokenizer, padded_vocab_size(m))
    model = build_hf_model(m, state, ids, {"model": dataclasses.asdict(m), "source": source,
                                           "tokenizer": trained.record() if trained else None})
    with atomic_path(output, overwrite) as tmp:
        write_hf_dir(model, tmp, dtype, tokenizer)
        if adapter:  # peft wraps the base in place: after the base is written
            peft_model(model, hf_adapters(factors, m), saved.finetune.lora, m,
                       Path(output)).save_pretrained(tmp / ADAPTER_DIR)
    return Path(output)


# -- import -------------------------------------------------------------------------------------

def load_hf(directory: str):
    from transformers import AutoModelForCausalLM

    root = Path(directory)
    if not (root / "config.json").is_file():
        raise ToolError(f"--hf {directory}: no config.json there (a Hugging Face model dir)")
    try:
        config = json.loads((root / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ToolError(f"--hf {root / 'config.json'}: not valid JSON ({err}); re-download or "
                        "re-export the model") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in (LLAMA, GPT2):  # checked before any weights load
        raise ToolError(f"--hf {directory}: model_type {model_type} is not supported (llama or "
                        "gpt2)")
    if not any(root.glob("*.safetensors")) and not any(root.glob("pytorch_model*.bin")):
        raise ToolError(f"--hf {directory}: no weights there (model.safetensors or "
                        "pytorch_model.bin); copy the model's weight files next to config.json")
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)


def _vocabulary(rows: int, extras: dict) -> dict:
    """Unpadded vocabulary and padding multiple whose padded size is the HF embedding's."""
    from megatron_pn.config import ModelConfig
    from megatron_pn.model import padded_vocab_size

    saved = extras.get("model", {})
    if "vocab_size" in saved:
        vocab = {k: saved[k] for k in ("vocab_size", "make_vocab_size_divisible_by")}
        if padded_vocab_size(ModelConfig(**vocab)) == rows:
            return vocab
    multiple = next(p for p in (128, 64, 32, 16, 8, 4, 2, 1) if rows % p == 0)
    return {"vocab_size": rows, "make_vocab_size_divisible_by": multiple}


def llama_fields(c) -> dict:
    rope = dict(getattr(c, "rope_parameters", None) or {})
    theta = rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))
    if rope.get("rope_type", "default") != "default":
        raise ToolError(f"rope_type {rope['rope_type']} (RoPE scaling) is not supported")
    if c.hidden_act != "silu":
        raise ToolError(f"hidden_act {c.hidden_act} is not supported (silu: SwiGLU)")
    if getattr(c, "head_dim", None) not in (None, c.hidden_size // c.num_attention_heads):
        raise ToolError(f"head_dim {c.head_dim} != hidden_size / num_attention_heads")
    if float(theta) != int(theta):
        raise ToolError(f"rope_theta {theta} is not an integer (model.rotary_base)")
    groups = c.num_key_value_heads or c.num_attention_heads
    return dict(
        num_layers=c.num_hidden_layers, hidden_size=c.hidden_size,
        num_attention_heads=c.num_attention_heads,
        num_query_groups=None if groups == c.num_attention_heads else groups,
        ffn_hidden_size=c.intermediate_size, activation="swiglu", normalization="RMSNorm",
        norm_epsilon=c.rms_norm_eps, position_embedding_type="rope", rotary_base=int(theta),
        add_bias_linear=bool(c.attention_bias or getattr(c, "mlp_bias", False)))


def gpt2_fields(c, hf_state: dict, extras: dict) -> dict:
    if c.activation_function != "gelu":
        raise ToolError(f"activation_function {c.activation_function} is not supported: "
                        "megatron-pn's gelu is the exact (erf) GELU")
    if not c.scale_attn_weights or c.scale_attn_by_inverse_layer_idx:
        raise ToolError("GPT-2 attention scaling other than 1/sqrt(head_dim) is not supported")
    # What GPT-2 cannot express comes from the exporter's record, unless the weights have
    # changed since (fine-tuned biases, K/V heads no longer repeated): never drop information.
    saved = extras.get("model", {})
    biases = saved.get("add_bias_linear", False) or _gpt2_has_linear_biases(hf_state, c.n_layer)
    groups = saved.get("num_query_groups")
    if groups and not _gpt2_kv_repeated(hf_state, c, groups):
        groups = None
    return dict(
        num_layers=c.n_layer, hidden_size=c.n_embd, num_attention_heads=c.n_head,
        num_query_groups=groups, ffn_hidden_size=c.n_inner or 4 * c.n_embd, activation="gelu",
        normalization="LayerNorm", norm_epsilon=c.layer_norm_epsilon,
        position_embedding_type="learned_absolute", seq_length=c.n_positions,
        add_bias_linear=bool(biases))


def imported_model_config(hf_model, base, from_yaml: bool):
    """The model section: shapes from the HF config; what HF does not fix (context of a RoPE
    model, dropout, init std) from --config, else from the exporter's record, else defaults."""
    from megatron_pn.families.base import dense_model_config

    c = hf_model.config
    extras = getattr(c, EXTRAS_KEY, None) or {}
    state = hf_model.state_dict()
    m = copy.deepcopy(base)
    if not from_yaml:
        for key in ("seq_length", "init_method_std", "hidden_dropout", "attention_dropout"):
            if key in extras.get("model", {}):
                setattr(m, key, extras["model"][key])
        if c.model_type == LLAMA and "seq_length" not in extras.get("model", {}):
            m.seq_length = c.max_position_embeddings
    if dense_model_config(m).type != m.type:
        print(f"pn-import-hf: note: model.type {m.type} of --config becomes dense",
              file=sys.stderr)
    fields = llama_fields(c) if c.model_type == LLAMA else gpt2_fields(c, state, extras)
    rows = state["model.embed_tokens.weight" if c.model_type == LLAMA
                 else "transformer.wte.weight"].shape[0]
    fields.update(_vocabulary(rows, extras), tie_embeddings=bool(c.tie_word_embeddings))
    return dataclasses.replace(dense_model_config(m), **fields)


def import_state(hf_model, m) -> dict:
    state = hf_model.state_dict()
    return (from_llama if hf_model.config.model_type == LLAMA else from_gpt2)(state, m)


def write_checkpoint(model, cfg, output: str | Path, overwrite: bool = False,
                     extra: dict | None = None) -> Path:
    """A model-only checkpoint of this process's model, written by `checkpoint.save` at
    iteration 0, plus `model.yaml`; returns the checkpoint root (atomic: all or nothing)."""
    from megatron_pn import checkpoint

    with atomic_path(output, overwrite) as tmp:
        checkpoint.save(tmp, 0, [model], extra={"consumed_samples": 0, "config": cfg.to_dict(),
                                                **(extra or {})})
        model_yaml = yaml.safe_dump({"model": dataclasses.asdict(cfg.model)}, sort_keys=False)
        atomic_write_text(tmp / "model.yaml", model_yaml)
    return Path(output)


def import_hf(hf_dir: str, output: str, config_files: list[str] = (),
              overwrite: bool = False) -> Path:
    """Write a Hugging Face Llama/GPT-2 model as a megatron-pn checkpoint; returns its root."""
    from megatron.core import tensor_parallel

    from megatron_pn.config import load_config
    from megatron_pn.model import build_model
    from megatron_pn.checks import check_model

    check_writable(output, overwrite)
    base = load_config(list(config_files))
    hf_model = load_hf(hf_dir)
    cfg = copy.deepcopy(base)
    cfg.model = imported_model_config(hf_model, base.model, bool(config_files))
    cfg.parallel = dataclasses.replace(cfg.parallel, tensor=1, pipeline=1, virtual_pipeline=None)
    check_model(cfg)
    state = import_state(hf_model, cfg.model)
    extras = getattr(hf_model.config, EXTRAS_KEY, None) or {}
    tokenizer = hf_model_fingerprint(hf_dir, extras)  # the checkpoint records it again
    del hf_model
    with inference_world(single_process=True) as env:
        cfg.train.precision = "fp32"
        tensor_parallel.model_parallel_cuda_manual_seed(cfg.train.seed)
        [model] = build_model(cfg, env.device.type, initialize=False)
        expected = model.state_dict()
        state.update({k: v for k, v in expected.items() if k.endswith("_extra_state")})
        check_shapes(state, expected, "import")
        model.load_state_dict(state, strict=True)
        cfg.train.precision = base.train.precision
        cfg.checkpoint = dataclasses.replace(cfg.checkpoint, dir=None, load=None)
        return write_checkpoint(model, cfg, output, overwrite, {
            "imported_from": str(hf_dir), "tokenizer": tokenizer.record() if tokenizer else None})
