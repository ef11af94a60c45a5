"""SLM-cond (model.type cond), the cluster-conditioned control: with zero vectors it is the SLM,
its folded dense model (pn-project, pn-export-hf) predicts what it predicts for that cluster, it
trains on per-cluster data and specializes through pn-project, bad cluster ids are refused."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import perturbed_model, run_train, tiny_pn_overrides, write_cluster_datasets
from megatron_pn.config import load_config

COND, SLM = "configs/tiny/cond.yaml", "configs/tiny/slm.yaml"


def cfg_of(path, *overrides):
    return load_config([path], ["model.vocab_size=257", "data.eod_id=256", *overrides])


def forward(model, ids, **routing):
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        return model(ids, positions, None, **routing)


def tokens(batch=4, seq=32, seed=0):
    return torch.randint(0, 257, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_zero_cluster_vectors_give_the_slm(world):
    from megatron_pn.model import build_gpt, transformer_config

    def built(path):
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(3)
        cfg = cfg_of(path)
        return build_gpt(cfg, transformer_config(cfg, "cpu")).eval()

    cond, slm = built(COND), built(SLM)
    assert torch.count_nonzero(cond.cluster_vectors) == 0  # zeros at init: the SLM's start
    ids = tokens()
    assert torch.equal(forward(cond, ids, cluster_ids=[0, 1, 2, 3]), forward(slm, ids))
    with torch.no_grad():
        cond.cluster_vectors[2].fill_(0.1)
    moved = forward(cond, ids, cluster_ids=[0, 1, 2, 3])
    plain = forward(slm, ids)
    assert torch.equal(moved[:2], plain[:2]) and not torch.equal(moved[2], plain[2])


def log_probs(logits):
    return torch.log_softmax(logits.double(), dim=-1)


@pytest.mark.parametrize("weights", [[0.0, 1.0, 0.0, 0.0], [0.25, 0.5, 0.0, 0.25]])
def test_folded_model_predicts_what_the_conditioned_model_does(world, weights):
    """Folding a cluster's vector (or a mixture's) into the tied embedding table shifts every
    logit of a position by one constant: the same distribution, at the SLM's size."""
    from megatron_pn.families import family_of

    cfg = cfg_of(COND)
    cond = perturbed_model(cfg, seed=5)
    family = family_of(cfg)
    folded = family.dense_config(cfg.model)
    assert (folded.type, folded.num_experts, folded.tie_embeddings) == ("dense", 0, True)
    dense = perturbed_model(cfg_of(SLM), seed=0)
    missing, unexpected = dense.load_state_dict(family.dense_state(cond, weights), strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing)
    ids = tokens()
    vector = torch.tensor(weights) @ cond.cluster_vectors.detach()
    with torch.no_grad():  # the conditioned model on this mixture: its vector for every row
        saved = cond.cluster_vectors.detach().clone()
        cond.cluster_vectors[0] = vector
        expected = forward(cond, ids, cluster_ids=[0] * len(ids))
        cond.cluster_vectors.copy_(saved)
    got = forward(dense, ids)
    assert (log_probs(got) - log_probs(expected)).abs().max() < 1e-5
    assert not torch.allclose(got, expected)  # the logits themselves differ by the shift


def test_folded_hf_export_equals_the_conditioned_model(world, tmp_path):
    from megatron_pn.cli.hf import export_main
    from megatron_pn.hf import write_checkpoint
    from transformers import AutoModelForCausalLM

    cfg = cfg_of(COND)
    cond = perturbed_model(cfg, seed=9)
    ckpt = write_checkpoint(cond, cfg, tmp_path / "ckpt")
    assert export_main(["--checkpoint", str(ckpt), "--expert", "2",
                        "--output", str(tmp_path / "hf")]) == 0
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_config["tie_word_embeddings"] is True  # the SLM's size: no extra output layer
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids = tokens()
    with torch.no_grad():
        got = hf(ids).logits
    expected = forward(cond, ids, cluster_ids=[2] * len(ids))
    assert got.shape == expected.shape
    assert (log_probs(got) - log_probs(expected)).abs().max() < 1e-4


def test_bad_cluster_ids_are_refused(world, capsys):
    from megatron_pn.checks import check_eval_sets
    from pn_base.errors import ConfigError

    cond = perturbed_model(cfg_of(COND), seed=1)
    with pytest.raises(ValueError, match=r"cluster id 4 is outside \[0, 4\)"):
        forward(cond, tokens(), cluster_ids=[0, 1, 4, 2])
    with pytest.raises(ConfigError, match=r"expert 7 of generic outside \[0, model.num_experts"):
        check_eval_sets(cfg_of(COND, "train.eval_sets=[[generic, some/prefix, 7]]"))
    with pytest.raises(ValueError, match="3 cluster weights for 4 clusters"):
        from megatron_pn.families import family_of

        family_of(cfg_of(COND)).dense_state(cond, [0.5, 0.5, 0.0])


@pytest.mark.slow
def test_cond_trains_on_clusters_and_specializes(world, tmp_path):
    """pn-train on per-cluster data (each row with its cluster's vector), pn-project of the spec
    set's most frequent cluster, pn-eval: the projected dense model scores as the conditioned
    model does on that cluster."""
    from helpers import real_text_documents, write_byte_dataset
    from megatron_pn.cli.evaluate import main as pn_eval
    from megatron_pn.cli.project import main as pn_project

    blend = write_cluster_datasets(tmp_path / "clusters")
    run = tmp_path / "run"
    run_train([COND, *tiny_pn_overrides(blend, run, **{
        "train.steps": 6, "data.split": "80,20,0", "checkpoint.dir": run / "ckpt"})])
    assert json.loads((run / "finished.json").read_text())["step"] == 6
    # a spec set of cluster 1's documents (upper-case): its histogram says cluster 1
    spec = tmp_path / "spec"
    spec.mkdir()
    docs = [d.upper() for d in real_text_documents(20_000)]
    prefix = write_byte_dataset(spec / "text", docs)
    (spec / "histogram.json").write_text(json.dumps({
        "k": 4, "tokens": [0, 100, 0, 0], "source_prefix": str(prefix),
        "centroids_sha256": "c" * 64}))
    assert pn_project(["--checkpoint", str(run / "ckpt"), "--spec-data", str(spec),
                       "--strategy", "most-frequent", "--output", str(tmp_path / "proj")]) == 0
    assert json.loads((tmp_path / "proj" / "projection.json").read_text())["expert"] == 1
    out = {}
    for name, args in (("cond", ["--checkpoint", run / "ckpt", "--expert", "1"]),
                       ("folded", ["--checkpoint", tmp_path / "proj"])):
        path = tmp_path / f"{name}.json"
        assert pn_eval([*map(str, args), "--data", str(prefix), "--max-tokens", "2000",
                        "--output", str(path), "--quiet"]) == 0
        out[name] = json.loads(path.read_text())["datasets"][0]["nll"]
    assert out["folded"] == pytest.approx(out["cond"], rel=1e-5)
