"""Selection you can trust: validation scores the same fixed windows of the validation split
every time (pn-eval's windows, capped at train.valid_tokens), records their standard error, and
a candidate replaces the best only beyond train.selection_margin (auto: the paired standard
error of the difference); the decision is the same in every run, at any layout and after a
resume."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from megatron.core import dist_checkpointing

from helpers import (read_metrics, real_text_documents, run_train, tiny_overrides,
                     tiny_pn_overrides, write_byte_dataset, write_cluster_datasets,
                     write_model_checkpoint)
from megatron_pn import checkpoint
from megatron_pn.config import Config, load_config
from megatron_pn.costs import mean_and_stderr
from megatron_pn.training.selection import Scores, Selection
from pn_base.errors import UserError

CONFIG, FINETUNE = "configs/tiny/slm.yaml", "configs/finetune/tiny.yaml"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_byte_dataset(tmp_path_factory.mktemp("sel_data") / "text", real_text_documents())


def scores(sums, size: int = 10, windows: str = "w") -> Scores:
    sums = np.asarray(sums, dtype=np.float64)
    return Scores(sums, np.full(len(sums), size), windows)


# -- the standard error ------------------------------------------------------------------------

def test_stderr_is_the_ratio_estimators_over_windows():
    sums, sizes = np.array([12.0, 7.0, 30.0]), np.array([4, 2, 10])
    mean = 49 / 16
    by_hand = math.sqrt(sum((s - mean * n) ** 2 for s, n in zip(sums, sizes)) / (3 * 2)) / (16 / 3)
    assert mean_and_stderr(sums, sizes) == pytest.approx((mean, by_hand), rel=1e-12)
    # windows of one size: the standard error of the per-window mean NLLs
    equal = np.array([30.0, 41.0, 52.0, 38.0])
    assert mean_and_stderr(equal, np.full(4, 10))[1] == pytest.approx(
        np.std(equal / 10, ddof=1) / 2, rel=1e-12)
    assert mean_and_stderr(np.array([5.0]), np.array([2])) == (2.5, None)
    assert mean_and_stderr(np.zeros(0), np.zeros(0)) == (None, None)


# -- the margin rule ---------------------------------------------------------------------------

def test_a_candidate_replaces_the_best_only_beyond_the_margin():
    cfg = Config()
    cfg.train.selection_margin, cfg.train.early_stopping_patience = "0.05", 2
    selection = Selection(cfg)
    best = np.array([30.0, 40.0, 50.0, 60.0])  # 4 windows of 10 tokens: 4.5 nats per token
    assert selection.observe(0, scores(best))
    assert not selection.observe(1, scores(best - 0.4))  # 0.04 nats better: within
    assert (selection.best_step, selection.evals_since_best) == (0, 1)
    assert selection.observe(2, scores(best - 0.6))  # 0.06 nats better: beyond
    assert (selection.best_step, selection.evals_since_best) == (2, 0)
    assert selection.best == pytest.approx(4.44)
    assert not selection.observe(3, scores(best - 0.6)) and not selection.patience_exhausted()
    assert not selection.observe(4, scores(best - 1.0))  # 0.04 better than the best: within
    assert selection.patience_exhausted()


def test_the_auto_margin_is_the_paired_standard_error_of_the_difference():
    selection = Selection(Config())  # train.selection_margin: auto
    rng = np.random.default_rng(0)
    best = rng.normal(40.0, 5.0, size=100)  # windows of 10 tokens
    assert selection.observe(0, scores(best))
    # 0.01 nats better on every window: far below the unpaired standard error of either
    # evaluation (~0.05), but the difference has no noise: it replaces the best
    assert scores(best).stderr > 0.04
    assert selection.observe(1, scores(best - 0.1))
    # 0.02 nats better on average, but spread over the windows: within its standard error
    spread = rng.normal(0.0, 3.0, size=100)
    candidate = scores(best - 0.1 - 0.2 + spread - spread.mean())
    margin = selection.margin_over_best(candidate)
    assert margin == pytest.approx(np.std(spread / 10, ddof=1) / 10, rel=1e-9)
    assert selection.best - candidate.nll == pytest.approx(0.02) and 0.02 < margin
    assert not selection.observe(2, candidate) and selection.best_step == 1


def test_the_state_a_checkpoint_keeps_decides_as_before(tmp_path):
    """Through torch.save and back, as the checkpoint's common state: the same floats, the same
    decisions; scores of other windows than the best's are refused."""
    rng = np.random.default_rng(1)
    best = rng.normal(40.0, 5.0, size=50)
    first = Selection(Config())
    first.observe(0, scores(best))
    first.observe(2, scores(best + 1.0))
    torch.save({"early_stopping": first.state_dict()}, tmp_path / "common.pt")
    second = Selection(Config())
    second.load_state_dict(torch.load(tmp_path / "common.pt")["early_stopping"])
    assert second.state_dict() == first.state_dict()
    assert np.array_equal(second.best_sums, best)
    candidate = scores(best - 0.3 + rng.normal(0.0, 1.0, size=50))
    assert second.margin_over_best(candidate) == first.margin_over_best(candidate)
    assert second.observe(4, candidate) == first.observe(4, candidate)
    with pytest.raises(UserError, match="other windows than the best"):
        second.observe(6, scores(best, windows="other"))


def test_a_checkpoint_that_saved_train_eval_steps_still_loads():
    """(a config file or override naming it is refused with what replaced it:
    test_reliability)"""
    from megatron_pn.config import config_from_dict

    saved = Config().to_dict()
    saved["train"]["eval_steps"] = 4
    assert config_from_dict(saved).train.valid_tokens == Config().train.valid_tokens


# -- the windows -------------------------------------------------------------------------------

def test_validation_is_the_first_windows_of_the_validation_split(dataset, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_pn.data import split_documents
    from megatron_pn.evaluate import document_windows
    from megatron_pn.training.validation import validation_windows

    cfg = load_config([CONFIG], tiny_overrides(dataset, tmp_path, **{
        "train.eval_interval": 5, "data.split": "80,20,0", "train.valid_tokens": 3000}))
    [held] = validation_windows(cfg)
    assert np.array_equal(held.windows, validation_windows(cfg)[0].windows)  # fixed
    index = IndexedDataset(str(dataset))
    lengths = index.sequence_lengths.copy()  # (a view of the index: the dataset must live)
    begin, end = split_documents(len(lengths), "80,20,0", 1)  # megatron-core's valid documents
    assert held.windows[0, 0] == begin and held.num_tokens == 3000
    expected = document_windows(lengths[begin:end], 64, 3000)
    expected[:, 0] += begin
    assert np.array_equal(held.windows, expected)
    cfg.train.valid_tokens = 10**9  # the whole split when it is smaller
    assert validation_windows(cfg)[0].num_tokens == lengths[begin:end].sum()


def test_validation_datasets_share_the_tokens_by_weight_and_carry_their_cluster(tmp_path):
    from megatron_pn.training.validation import validation_windows

    blend = write_cluster_datasets(tmp_path / "clusters", num_clusters=2)
    entries = json.loads(blend.read_text())["blend"]
    a, b = entries[0][1], entries[1][1]
    cfg = load_config([CONFIG], tiny_overrides(a, tmp_path, **{
        "train.eval_interval": 5, "train.valid_tokens": 4000,
        "data.valid_blend": f"[[1, {a}], [3, {b}]]"}))
    first, second = validation_windows(cfg)
    assert (first.num_tokens, second.num_tokens) == (1000, 3000)
    assert first.cluster_ids is None  # a dense model routes nothing
    pn = load_config(["configs/tiny/pn.yaml"], tiny_pn_overrides(blend, tmp_path, **{
        "train.eval_interval": 5, "data.split": "80,20,0"}))
    for cluster, held in enumerate(validation_windows(pn)):
        assert len(held.windows) and set(held.cluster_ids) == {cluster}


# -- in training ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def start(dataset, tmp_path_factory):
    """A model to fine-tune from (initialized weights: validation moves at every step)."""
    path = tmp_path_factory.mktemp("sel_start") / "ckpt"
    return write_model_checkpoint(path, [CONFIG], tiny_overrides(dataset, path.parent))


def selection_state(run, step: int) -> dict:
    """The selection state a run's checkpoint of `step` keeps."""
    path = checkpoint.iteration_dir(run / "ckpt", step)
    return dist_checkpointing.load_common_state_dict(str(path))["early_stopping"]


@pytest.mark.slow
def test_every_run_scores_the_same_windows_and_keeps_the_same_step(dataset, start, tmp_path):
    """Two runs of one config log the same validations and keep the same checkpoint; a run
    stopped between evaluations and resumed goes on from its selection state (the best's window
    sums), bit for bit. (A margin of 0.2 nats lets some evaluations pass without replacing the
    best, so what the resumed run keeps depends on the state it resumed.)"""
    def finetune(name, **extra):
        run = tmp_path / name
        run_train([CONFIG, FINETUNE, *tiny_overrides(dataset, run, **{
            "checkpoint.load": start, "checkpoint.dir": run / "ckpt", "data.split": "90,10,0",
            "train.steps": 8, "train.eval_interval": 2, "train.valid_tokens": 2048,
            "train.selection_margin": 0.2, "train.log_interval": 1, **extra})])
        return run

    first, second = finetune("first"), finetune("second")
    valid = read_metrics(first, "valid")
    assert sorted(valid) == [0, 2, 4, 6, 8] and valid == read_metrics(second, "valid")
    assert all(v["tokens"] == 2048 and 0 < v["stderr"] < 0.1 for v in valid.values())
    finished = json.loads((first / "finished.json").read_text())
    assert finished == json.loads((second / "finished.json").read_text())
    states = [selection_state(run, 8) for run in (first, second)]
    assert states[0] == states[1] and states[0]["best_step"] == finished["best_step"]

    resumed = finetune("resumed", **{"train.exit_after_steps": 3})
    assert selection_state(resumed, 3)["best_sums"] is not None  # (no evaluation at step 3)
    finetune("resumed")
    assert read_metrics(resumed, "valid") == valid
    assert json.loads((resumed / "finished.json").read_text()) == finished
    assert selection_state(resumed, 8) == states[0]


@pytest.mark.slow
def test_validation_is_the_same_at_every_layout(dataset, start, tmp_path):
    """Data-parallel ranks split the windows (under ZeRO-3 in as many forward passes each),
    pipeline stages pass them on: the validation split and train.eval_sets score the same as in
    one process."""
    def evaluate(name, nproc, **extra):
        run = tmp_path / name
        run_train([CONFIG, *tiny_overrides(dataset, run, **{
            "checkpoint.load": start, "train.steps": 0, "train.eval_interval": 1,
            "train.valid_tokens": 1000, "train.eval_sets": f"[[text, {dataset}]]",
            "train.eval_sets_max_tokens": 700, **extra})], nproc=nproc)
        return read_metrics(run, "valid")[0], read_metrics(run, "eval/text")[0]

    single = evaluate("single", 1)
    assert single[0]["tokens"] == 1000 and single[1]["tokens"] == 700
    layouts = (evaluate("dp2", 2), evaluate("pp2", 2, **{"parallel.pipeline": 2}),
               evaluate("zero3", 2, **{"engine": "deepspeed", "deepspeed.zero_stage": 3}))
    for layout in layouts:
        for got, want in zip(layout, single):
            assert got["tokens"] == want["tokens"]
            assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)
            assert got["stderr"] == pytest.approx(want["stderr"], rel=1e-4)
