"""Specialization: pn-project's expert selection strategies (known answers), the dense checkpoint
it writes, fine-tuning with lr/3, early stopping and the best checkpoint kept, cost records."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch

from helpers import (read_metrics, run_train, tiny_overrides, tiny_pn_overrides,
                     write_cluster_datasets, write_model_checkpoint)
from megatron_pn import checkpoint
from megatron_pn.cli.project import main as pn_project

PN_CONFIG = "configs/tiny/pn.yaml"
CENTROIDS = "c" * 64  # the clustering the tiny PNs train on (clusters.json beside the blend)


@pytest.fixture(scope="module")
def clusters(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec")
    blend = write_cluster_datasets(root / "data")
    write_manifest(blend, CENTROIDS)
    return root, blend


def write_manifest(blend, centroids, **extra):
    """The clusters.json `pn-data cluster` writes beside its blend (what pn-project reads)."""
    (blend.parent / "clusters.json").write_text(json.dumps(
        {"k": 4, "centroids_sha256": centroids, **extra}))


@pytest.fixture(scope="module")
def initial_pn(clusters):
    """(root, blend, checkpoint) of the tiny PN as initialized: what the histogram/most-frequent
    identity and the bad-input cases need."""
    root, blend = clusters
    ckpt = write_model_checkpoint(root / "pn_init", [PN_CONFIG],
                                  tiny_pn_overrides(blend, root / "unused"))
    return root, blend, ckpt


@pytest.fixture(scope="module")
def trained_pn(clusters):
    root, blend = clusters
    run_train([PN_CONFIG, *tiny_pn_overrides(blend, root / "pn", **{
        "data.split": "80,20,0", "train.steps": 8, "checkpoint.dir": root / "pn" / "ckpt"})])
    return root, blend, root / "pn" / "ckpt"


def spec_dir(root, name, tokens, source, **extra):
    """What `pn-data assign` writes for a specialization set (the keys pn-project reads)."""
    path = root / name
    path.mkdir(exist_ok=True)
    (path / "histogram.json").write_text(json.dumps({
        "k": len(tokens), "tokens": tokens, "windows": tokens, "source_prefix": str(source),
        "centroids_sha256": CENTROIDS, **extra}))
    return path


def spec_of(path):
    from megatron_pn.specialize import read_histogram

    return read_histogram(path / "histogram.json", 4, str(path))


@pytest.fixture(scope="module")
def tool_world():
    """The process world pn-project's functions run in."""
    from megatron_pn.checkpoint_tools import inference_world

    with inference_world(single_process=True) as env:
        yield env


def load_pn(ckpt, env):
    from megatron_pn.checkpoint_tools import load_model

    loaded = load_model(ckpt, env)
    return loaded.cfg, loaded.device, loaded.model


@pytest.mark.slow
def test_strategies_on_constructed_histograms(trained_pn, tool_world):
    """(best-loss needs trained experts: at initialization blowing up the others' weights need
    not make them worse)"""
    from megatron_pn.specialize import choose

    root, _, ckpt = trained_pn
    cfg, device, model = load_pn(ckpt, tool_world)
    source = root / "data" / "cluster_0001"
    spec = spec_of(spec_dir(root, "s1", [10, 70, 5, 15], source))
    assert choose("most-frequent", spec, model, cfg, device, 4096)[0] == 1
    assert choose("cluster=3", spec, model, cfg, device, 4096)[0] == 3
    expert, weights, _ = choose("histogram", spec, model, cfg, device, 4096)
    assert expert is None and weights == pytest.approx([0.1, 0.7, 0.05, 0.15])
    assert choose("cluster=3", spec, model, cfg, device, 4096)[1] == [0.0, 0.0, 0.0, 1.0]

    # best-loss: every expert but 2 gets its MLP weights blown up (codes x 50): 2 must win.
    with torch.no_grad():
        saved = model.expert_codes.clone()
        model.expert_codes.mul_(50.0)
        model.expert_codes[2] = saved[2]
    expert, _, details = choose("best-loss", spec, model, cfg, device, 4096)
    model.expert_codes.data.copy_(saved)
    assert expert == 2 and np.argmin(details["losses"]) == 2
    assert details["tokens"] == 4096 and len(details["stderrs"]) == 4  # each expert's noise
    assert all(0 < stderr < 0.5 for stderr in details["stderrs"])


def test_histogram_strategy_with_one_hot_histogram_is_most_frequent(initial_pn, tool_world):
    """The mixture code sum_i p_i E_i of a one-hot histogram is expert i's code exactly, and so
    is every projected weight; a real mixture is the projection of the mixed code."""
    from megatron_pn.families import family_of
    from megatron_pn.pn.projection import dense_state_dict
    from megatron_pn.specialize import choose

    root, _, ckpt = initial_pn
    cfg, device, model = load_pn(ckpt, tool_world)
    spec = spec_of(spec_dir(root, "onehot", [0, 0, 9, 0], root / "data" / "cluster_0002"))
    _, weights, _ = choose("histogram", spec, model, cfg, device, 4096)
    family = family_of(cfg)
    mixed_one_hot = family.dense_state(model, weights)
    hard = dense_state_dict(model, expert=choose("most-frequent", spec, model, cfg, device, 0)[0])
    mixed = family.dense_state(model, [0.5, 0.0, 0.5, 0.0])
    code = 0.5 * model.expert_codes[0] + 0.5 * model.expert_codes[2]
    key = "decoder.layers.0.mlp.linear_fc1.weight"
    assert torch.allclose(mixed[key], dense_state_dict(model, code=code)[key], atol=1e-6)
    for key, value in hard.items():
        if isinstance(value, torch.Tensor):  # (skip the None `_extra_state` entries)
            assert torch.equal(mixed_one_hot[key], value), key


@pytest.mark.slow
def test_project_then_finetune_with_early_stopping(trained_pn, tmp_path):
    root, _, ckpt = trained_pn
    spec_train = root / "data" / "cluster_0003"
    spec = spec_dir(root, "s3", [1, 2, 3, 90], spec_train)
    projected = tmp_path / "projected"
    code = pn_project(["--checkpoint", str(ckpt), "--spec-data", str(spec), "--output",
                       str(projected)])
    assert code == 0
    saved = checkpoint.saved_config(projected)
    assert saved.model.type == "dense" and saved.model.num_experts == 0
    record = json.loads((projected / "projection.json").read_text())
    assert (record["strategy"], record["expert"]) == ("most-frequent", 3)
    # A model-only checkpoint as checkpoint.dir is a starting point, not a run to resume.
    start = run_train(["configs/tiny/slm.yaml", *tiny_overrides(spec_train, tmp_path / "as_dir",
                       **{"checkpoint.dir": projected, "train.steps": 1,
                          "checkpoint.save_at_end": "false"})])
    assert "holds model weights only: starting from them at step 0" in start.stdout

    run_dir = tmp_path / "ft"
    run_train(["configs/tiny/slm.yaml", "configs/finetune/tiny.yaml", *tiny_overrides(
        spec_train, run_dir, **{
            "checkpoint.load": projected, "checkpoint.dir": run_dir / "ckpt",
            "data.valid_blend": f"[{root / 'data' / 'cluster_0001'}]", "data.split": "100,0,0",
            "train.eval_interval": 1, "train.early_stopping_patience": 2, "train.steps": 200,
            "train.valid_tokens": 2048, "train.selection_margin": 0, "train.log_interval": 1})])
    train, valid = read_metrics(run_dir), read_metrics(run_dir, "valid")
    pretrain_lr = checkpoint.saved_config(ckpt).train.lr
    assert train[1]["lr"] == pytest.approx(pretrain_lr / 3)  # lr / 3, constant
    last = max(train)
    assert last < 200  # early stopping ended it
    losses = {step: v["loss"] for step, v in valid.items()}
    best = min(losses, key=losses.get)
    assert all(losses[s] >= losses[best] for s in losses if s > best)
    assert last - best == 2  # two evaluations without improvement
    assert checkpoint.resolve(run_dir / "ckpt") == checkpoint.iteration_dir(run_dir / "ckpt", best)
    assert json.loads((run_dir / "finished.json").read_text()) == {
        "step": last, "reason": "early stopping", "best_step": best}
    cost = json.loads((run_dir / "cost.json").read_text())
    assert cost["runs"][-1]["phase"] == "finetune" and cost["total_device_hours"] > 0
    assert 0 < cost["runs"][-1]["cpu_seconds"] < 10 * cost["runs"][-1]["wall_seconds"]



@pytest.mark.slow
def test_finetuning_that_only_hurts_keeps_the_starting_model(trained_pn, tmp_path):
    """The loaded model is early stopping's first candidate: when every fine-tuned checkpoint is
    worse on validation (here an lr 300x the pretraining one), the run's best is step 0, whose
    weights are the ones it started from."""
    root, _, ckpt = trained_pn
    spec_train = root / "data" / "cluster_0003"
    projected = tmp_path / "projected"
    assert pn_project(["--checkpoint", str(ckpt), "--output", str(projected), "--spec-data",
                       str(spec_dir(root, "s3", [1, 2, 3, 90], spec_train))]) == 0
    common = {"data.valid_blend": f"[{root / 'data' / 'cluster_0001'}]", "data.split": "100,0,0",
              "train.eval_interval": 1, "train.valid_tokens": 2048, "train.log_interval": 1}
    run_dir = tmp_path / "ft"
    run_train(["configs/tiny/slm.yaml", "configs/finetune/tiny.yaml", *tiny_overrides(
        spec_train, run_dir, **common, **{
            "checkpoint.load": projected, "checkpoint.dir": run_dir / "ckpt",
            "train.lr_factor_of_loaded": 300, "train.early_stopping_patience": 2,
            "train.steps": 50})])
    losses = {step: v["loss"] for step, v in read_metrics(run_dir, "valid").items()}
    assert sorted(losses) == [0, 1, 2] and min(losses, key=losses.get) == 0
    assert json.loads((run_dir / "finished.json").read_text()) == {
        "step": 2, "reason": "early stopping", "best_step": 0}
    assert checkpoint.resolve(run_dir / "ckpt") == checkpoint.iteration_dir(run_dir / "ckpt", 0)
    # what the run keeps evaluates as the projected model did
    again = tmp_path / "again"
    run_train(["configs/tiny/slm.yaml", *tiny_overrides(spec_train, again, **common, **{
        "checkpoint.load": run_dir / "ckpt", "train.steps": 0})])
    assert read_metrics(again, "valid")[0]["loss"] == pytest.approx(losses[0], rel=1e-6)

def test_bad_input(initial_pn, tmp_path, capsys):
    root, blend, ckpt = initial_pn
    spec = spec_dir(root, "bad", [1, 1, 1, 1], root / "data" / "cluster_0000")

    def error(args):
        assert pn_project(args) == 2
        return capsys.readouterr().err

    out = str(tmp_path / "out")
    dense = write_model_checkpoint(tmp_path / "dense", ["configs/tiny/slm.yaml"],
                                   ["model.vocab_size=257"])
    assert "is a dense checkpoint; pn-project needs a model with one expert per cluster" in error(
        ["--checkpoint", str(dense), "--spec-data", str(spec), "--output", out])
    assert "no histogram.json" in error(
        ["--checkpoint", str(ckpt), "--spec-data", str(tmp_path), "--output", out])
    with pytest.raises(SystemExit) as bad:  # argparse: the command line itself
        pn_project(["--checkpoint", str(ckpt), "--spec-data", str(spec), "--output", out,
                    "--strategy", "best-loss", "--sample-tokens", "0"])
    assert bad.value.code == 2
    assert "--sample-tokens: expected a positive integer, got 0" in capsys.readouterr().err
    assert '"k" is 3 but the checkpoint has 4 experts' in error(
        ["--checkpoint", str(ckpt), "--spec-data", str(spec_dir(tmp_path, "k3", [1, 2, 3],
         root)), "--output", out])
    # The spec set was assigned with other centroids than the PN's clustering ...
    other = spec_dir(tmp_path, "other", [1, 2, 3, 4], root, centroids_sha256="b" * 64)
    assert "is another clustering than the checkpoint's" in error(
        ["--checkpoint", str(ckpt), "--spec-data", str(other), "--output", out])
    # ... or tokenized with another tokenizer than the clustering.
    write_manifest(blend, CENTROIDS, tokenizer_sha256="c" * 64)
    try:
        assert "tokenizer mismatch" in error(
            ["--checkpoint", str(ckpt), "--spec-data",
             str(spec_dir(tmp_path, "tok", [1, 2, 3, 4], root, tokenizer_sha256="d" * 64)),
             "--output", out])
    finally:
        write_manifest(blend, CENTROIDS)
    assert not (tmp_path / "out").exists()


# -- --histogram: the histogram alone ----------------------------------------------------------

def histogram_file(path, **content):
    """A histogram.json in its minimal form (what a data owner may send)."""
    path.write_text(json.dumps({"k": 4, "centroids_sha256": CENTROIDS, **content}))
    return path


def project_to(ckpt, out, *args):
    assert pn_project(["--checkpoint", str(ckpt), "--output", str(out), *map(str, args)]) == 0
    return out


def tensors(ckpt, env):
    """The tensors of a checkpoint's model state."""
    return {k: v for k, v in load_pn(ckpt, env)[2].state_dict().items()
            if isinstance(v, torch.Tensor)}


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_histogram_file_projects_as_its_spec_data(initial_pn, tool_world, tmp_path):
    """--histogram, from an assign output or in the minimal form, is the --spec-data projection
    of the same histogram (and not the most frequent expert's), with its source recorded."""
    root, _, ckpt = initial_pn
    spec = spec_dir(tmp_path, "spec", [1, 5, 2, 2], root / "data" / "cluster_0001")
    minimal = histogram_file(tmp_path / "sent.json", tokens=[10, 50, 20, 20])
    histogram = ["--strategy", "histogram"]
    by_spec = tensors(project_to(ckpt, tmp_path / "a", "--spec-data", spec, *histogram),
                      tool_world)
    for name, path in (("b", spec / "histogram.json"), ("c", minimal)):
        assert_same_tensors(tensors(project_to(ckpt, tmp_path / name, "--histogram", path,
                                               *histogram), tool_world), by_spec)
    frequent = tensors(project_to(ckpt, tmp_path / "d", "--histogram", minimal), tool_world)
    assert not torch.equal(frequent["decoder.layers.0.mlp.linear_fc1.weight"],
                           by_spec["decoder.layers.0.mlp.linear_fc1.weight"])
    record = json.loads((tmp_path / "c" / "projection.json").read_text())
    assert record["histogram_file"] == str(minimal) and record["spec_data"] is None
    assert record["clustering_matched"] == str(root / "data" / "clusters.json")
    assert record["histogram_sha256"] == hashlib.sha256(minimal.read_bytes()).hexdigest()
    assert record["weights"] == pytest.approx([0.1, 0.5, 0.2, 0.2])


def test_one_hot_histogram_file_is_that_expert(initial_pn, tool_world, tmp_path):
    from megatron_pn.pn.projection import dense_state_dict

    _, _, ckpt = initial_pn
    one_hot = histogram_file(tmp_path / "h.json", tokens=[0, 0, 7, 0])
    mixed = tensors(project_to(ckpt, tmp_path / "mixed", "--histogram", one_hot,
                               "--strategy", "histogram"), tool_world)
    expert = tensors(project_to(ckpt, tmp_path / "expert", "--histogram", one_hot,
                                "--strategy", "cluster=2"), tool_world)
    assert_same_tensors(mixed, expert)
    direct = dense_state_dict(load_pn(ckpt, tool_world)[2], expert=2)
    assert_same_tensors(mixed, {k: direct[k] for k in mixed})
    other = dense_state_dict(load_pn(ckpt, tool_world)[2], expert=1)
    assert not torch.equal(mixed["decoder.layers.0.mlp.linear_fc1.weight"],
                           other["decoder.layers.0.mlp.linear_fc1.weight"])


BAD_HISTOGRAMS = {  # file content -> the field its error names, and what it says
    "k": ('{"k": 3, "tokens": [1, 2, 3], "centroids_sha256": "%s"}', '"k" is 3'),
    "length": ('{"k": 4, "tokens": [1, 2, 3], "centroids_sha256": "%s"}',
               '"tokens" has 3 entries but the checkpoint has 4'),
    "negative": ('{"k": 4, "tokens": [1, -2, 3, 4], "centroids_sha256": "%s"}',
                 '"tokens": entry 1 is negative'),
    "zeros": ('{"k": 4, "tokens": [0, 0, 0, 0], "centroids_sha256": "%s"}',
              '"tokens": all zero'),
    "nan": ('{"k": 4, "tokens": [1, NaN, 3, 4], "centroids_sha256": "%s"}',
            '"tokens": entry 1 is not finite'),
    "inf": ('{"k": 4, "p": [0.5, 0.5, Infinity, 0], "centroids_sha256": "%s"}',
            '"p": entry 2 is not finite'),
    "text": ('{"k": 4, "tokens": [1, "2", 3, 4], "centroids_sha256": "%s"}',
             '"tokens": expected a list of 4 numbers'),
    "no tokens": ('{"k": 4, "windows": [1, 2, 3, 4], "centroids_sha256": "%s"}', 'no "tokens"'),
    "json": ('{"k": 4, "tokens": [1, 2, 3, 4]', "not valid JSON"),
    "array": ("[1, 2, 3, 4]", "expected a JSON object"),
    "no centroids": ('{"k": 4, "tokens": [1, 2, 3, 4]}',
                     'no "centroids_sha256", so nothing says which clustering its clusters are '
                     "— send the histogram.json of `pn-data assign` (it records them), or pass "
                     "--allow-clustering-mismatch"),
    "other centroids": ('{"k": 4, "tokens": [1, 2, 3, 4], "centroids_sha256": "%s"}' % ("b" * 64),
                        '"centroids_sha256" bbbbbbbbbbbb is another clustering than the '
                        "checkpoint's"),
}


@pytest.mark.parametrize("case", [*BAD_HISTOGRAMS, "no file", "directory"])
def test_bad_histogram_file_is_one_line_and_writes_nothing(initial_pn, tmp_path, capsys, case):
    _, _, ckpt = initial_pn
    path = tmp_path / "histogram.json"
    if case in BAD_HISTOGRAMS:
        content, said = BAD_HISTOGRAMS[case]
        path.write_text(content.replace("%s", CENTROIDS))
    elif case == "directory":
        path.mkdir()
        said = f"is a directory; give the file, {path / 'histogram.json'}"
    else:  # no file
        said = "cannot read it (No such file or directory)"
    code = pn_project(["--checkpoint", str(ckpt), "--histogram", str(path), "--strategy",
                       "histogram", "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"pn-project: error: --histogram {path}") and said in err
    assert not (tmp_path / "out").exists()


def test_best_loss_needs_the_spec_text(initial_pn, tmp_path, capsys):
    _, _, ckpt = initial_pn
    code = pn_project(["--checkpoint", str(ckpt), "--output", str(tmp_path / "out"),
                       "--histogram", str(histogram_file(tmp_path / "h.json", tokens=[1] * 4)),
                       "--strategy", "best-loss"])
    assert code == 2 and "give --spec-data" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def recorded_pn(tmp_path_factory):
    """A PN checkpoint pn-train saved (0 steps) from a clustering with its clusters.json, whose
    data is deleted after: only the checkpoint's record knows the clustering."""
    root = tmp_path_factory.mktemp("recorded")
    blend = write_cluster_datasets(root / "data")
    write_manifest(blend, "e" * 64)
    run_train([PN_CONFIG, *tiny_pn_overrides(blend, root / "run", **{
        "train.steps": 0, "checkpoint.dir": root / "ckpt"})])
    shutil.rmtree(root / "data")
    return root, blend, root / "ckpt"


def test_histogram_needs_no_training_data_and_checks_the_recorded_clustering(
        recorded_pn, tool_world, tmp_path, capsys):
    from megatron.core import dist_checkpointing

    from megatron_pn import checkpoint as ckpts

    _, blend, ckpt = recorded_pn
    assert not blend.parent.exists() and checkpoint.saved_config(ckpt).data.blend_file == str(blend)
    common = dist_checkpointing.load_common_state_dict(str(ckpts.resolve(ckpt)))
    assert common["clustering"] == {"centroids_sha256": "e" * 64, "k": 4}
    same = histogram_file(tmp_path / "same.json", tokens=[1, 2, 3, 4], centroids_sha256="e" * 64)
    project_to(ckpt, tmp_path / "out", "--histogram", same, "--strategy", "histogram")
    assert checkpoint.saved_config(tmp_path / "out").model.type == "dense"
    assert json.loads((tmp_path / "out" / "projection.json").read_text())[
        "clustering_matched"] == f"checkpoint {ckpts.resolve(ckpt)}"
    assert "warning" not in capsys.readouterr().err
    # the fixture's CENTROIDS are another clustering: refused, then allowed with a warning
    other = histogram_file(tmp_path / "other.json", tokens=[1, 2, 3, 4])
    args = ["--checkpoint", str(ckpt), "--histogram", str(other), "--output",
            str(tmp_path / "other")]
    assert pn_project(args) == 2
    err = capsys.readouterr().err
    assert f"is another clustering than the checkpoint's (checkpoint {ckpts.resolve(ckpt)}: " \
        "eeeeeeeeeeee)" in err and "--allow-clustering-mismatch" in err
    assert not (tmp_path / "other").exists()
    # --spec-data too is checked against the record
    spec = spec_dir(tmp_path, "spec", [1, 2, 3, 4], tmp_path / "text")
    assert pn_project(["--checkpoint", str(ckpt), "--spec-data", str(spec), "--output",
                       str(tmp_path / "spec_out")]) == 2
    assert f"clustering than the checkpoint's (checkpoint {ckpts.resolve(ckpt)}" in \
        capsys.readouterr().err
    assert pn_project([*args, "--allow-clustering-mismatch"]) == 0
    assert "allowed by --allow-clustering-mismatch" in capsys.readouterr().err
    assert json.loads((tmp_path / "other" / "projection.json").read_text())[
        "clustering_matched"] is None


def test_only_routed_runs_record_their_clustering(clusters):
    from megatron_pn.clustering import run_clustering
    from megatron_pn.config import load_config

    _, blend = clusters
    pn = load_config([PN_CONFIG], [f"data.blend_file={blend}"])
    assert run_clustering(pn) == {"centroids_sha256": CENTROIDS, "k": 4}
    assert run_clustering(load_config(["configs/tiny/slm.yaml"], [f"data.blend_file={blend}"])) \
        is None


# -- distillation (SLM-d) -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny dense "LLM" trained a few steps, and a student initialization."""
    from helpers import real_text_documents, write_byte_dataset

    root = tmp_path_factory.mktemp("distill")
    prefix = write_byte_dataset(root / "text", real_text_documents())
    run_train(["configs/tiny/llm.yaml", *tiny_overrides(prefix, root / "llm", **{
        "train.steps": 6, "checkpoint.dir": root / "llm" / "ckpt"})])
    run_train(["configs/tiny/slm.yaml", *tiny_overrides(prefix, root / "init", **{
        "train.steps": 0, "checkpoint.dir": root / "init" / "ckpt"})])
    return root, prefix


def distill_run(root, prefix, name, teacher_ckpt, nproc=1, **extra):
    run_dir = root / name
    run_train(["configs/tiny/slm.yaml", *tiny_overrides(prefix, run_dir, **{
        "train.steps": 5, "checkpoint.load": root / "init" / "ckpt",
        "distill.teacher": teacher_ckpt, **extra})], nproc=nproc)
    return [read_metrics(run_dir)[s]["loss"] for s in range(1, 6)]


@pytest.mark.slow
def test_distillation_from_itself_starts_at_zero_kl_and_matches_across_tp(teacher):
    root, prefix = teacher
    own = root / "init" / "ckpt"
    # The student's own initialization as teacher, w = 1: the first loss is KL(p || p) = 0.
    pure = distill_run(root, prefix, "self", own, **{"distill.weight": 1.0,
                                                      "distill.temperature": 2.0})
    assert abs(pure[0]) < 1e-6 and pure[-1] >= 0
    # A real teacher, w = 0.5: TP=2 (vocabulary-parallel softmax and KL) equals TP=1.
    llm = root / "llm" / "ckpt"
    single = distill_run(root, prefix, "tp1", llm)
    split = distill_run(root, prefix, "tp2", llm, nproc=2, **{"parallel.tensor": 2})
    assert split == pytest.approx(single, rel=1e-5)
    # w = 0 is plain training on the data.
    plain = root / "plain"
    run_train(["configs/tiny/slm.yaml", *tiny_overrides(prefix, plain, **{
        "train.steps": 5, "checkpoint.load": root / "init" / "ckpt"})])
    data_only = distill_run(root, prefix, "w0", llm, **{"distill.weight": 0.0})
    assert data_only == pytest.approx([read_metrics(plain)[s]["loss"] for s in range(1, 6)],
                                      rel=1e-5)


def test_distillation_bad_input(tmp_path, capsys):
    from helpers import real_text_documents, write_byte_dataset
    from megatron_pn.cli.train import main

    prefix = write_byte_dataset(tmp_path / "text", real_text_documents(60_000))
    llm = write_model_checkpoint(tmp_path / "llm", ["configs/tiny/llm.yaml"],
                                 ["model.vocab_size=257"])
    args = ["configs/tiny/slm.yaml", *tiny_overrides(prefix, tmp_path / "run"),
            f"distill.teacher={llm}"]
    assert main(args + ["distill.weight=1.5"]) == 2
    assert "distill.weight: must be in [0, 1], got 1.5" in capsys.readouterr().err
    assert main(args + ["model.vocab_size=1000"]) == 2
    assert "vocabulary 257 differs from the student's 1000" in capsys.readouterr().err
