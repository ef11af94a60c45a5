"""Mixture training (data.mixture) and instantiation from a cluster histogram: a one-hot mixture
is exactly the expert hard routing uses, the dense model of a mixture equals the PN computed with
that mixture's code, sampling follows the drawn weights, parallel layouts and a resumed run
reproduce the single-process curve, bad settings are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from helpers import losses, read_metrics, run_train, tiny_pn_overrides, write_cluster_datasets
from megatron_pn.cli.train import main
from megatron_pn.config import load_config
from megatron_pn.families import family_of, one_hot

PN_CONFIG = "configs/tiny/pn.yaml"
MAPS = ["linear", "learned"]


def tiny_cfg(code_map="linear"):
    values = {"model.vocab_size": 257, "model.num_experts": 4, "model.bank_size": 3,
              "model.code_size": 2, "model.code_map": code_map}
    return load_config([PN_CONFIG], [f"{k}={v}" for k, v in values.items()])


def build(cfg):
    """The config's PN with every parameter perturbed (a learned map that is not zero)."""
    from megatron_pn.model import build_gpt, transformer_config

    model = build_gpt(cfg, transformer_config(cfg, "cpu")).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def dense_of(cfg, state):
    from megatron_pn.model import build_gpt, transformer_config
    from megatron_pn.specialize import load_every_weight

    family = family_of(cfg)
    dense_cfg = load_config(["configs/tiny/slm.yaml"], ["model.vocab_size=257"])
    assert family.dense_config(cfg.model).num_layers == dense_cfg.model.num_layers
    dense = build_gpt(dense_cfg, transformer_config(dense_cfg, "cpu")).eval()
    load_every_weight(dense, state)
    return dense


def tokens(batch=3, seq=16):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 257, (batch, seq), generator=g)
    return ids, torch.arange(seq).expand(batch, seq)


@pytest.mark.parametrize("code_map", MAPS)
def test_a_one_hot_histogram_is_exactly_the_expert_hard_routing_uses(world, code_map):
    from megatron_pn.pn.projection import dense_state_dict

    cfg = tiny_cfg(code_map)
    model = build(cfg)
    for expert in range(4):
        from_histogram = family_of(cfg).dense_state(model, one_hot(expert, 4))
        from_routing = dense_state_dict(model, expert)
        assert from_histogram.keys() == from_routing.keys()
        for key, value in from_routing.items():
            if isinstance(value, torch.Tensor):  # (megatron's _extra_state: None)
                assert torch.equal(from_histogram[key], value), key
        assert torch.equal(model.codes((tuple(one_hot(expert, 4)),))[0],
                           model.codes((expert,))[0])
    if code_map == "learned":  # the map is part of the code, not E alone
        assert not torch.allclose(model.codes((0,))[0], model.expert_codes[0])


@pytest.mark.parametrize("code_map", MAPS)
def test_the_dense_model_of_a_mixture_equals_the_pn_computed_with_its_code(world, code_map):
    cfg = tiny_cfg(code_map)
    model = build(cfg)
    weights = (0.5, 0.1, 0.0, 0.4)
    dense = dense_of(cfg, family_of(cfg).dense_state(model, weights))
    ids, positions = tokens()
    with torch.no_grad():
        expected = model(ids, positions, None, mixture=torch.tensor(weights, dtype=torch.float64))
        got = dense(ids, positions, None)
        single = model(ids, positions, None, cluster_ids=[0, 0, 0])
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max())
    assert not torch.allclose(got, single, atol=1e-3)  # a mixture is not its largest expert


def test_a_learned_map_counts_in_pretraining_not_in_the_expert(world):
    counts = {}
    for code_map in MAPS:
        cfg = tiny_cfg(code_map)
        model = build(cfg)
        total = sum(p.numel() for p in model.parameters())
        counts[code_map] = total, family_of(cfg).expert_parameters([model], total)
    hidden = tiny_cfg().model.code_map_hidden  # k x hidden + hidden + hidden x m
    assert counts["learned"][0] - counts["linear"][0] == 4 * hidden + hidden + hidden * 2
    assert counts["learned"][1] == counts["linear"][1]


def test_pn_forward_needs_exactly_one_of_cluster_ids_and_mixture(world):
    model = build(tiny_cfg())
    ids, positions = tokens()
    with pytest.raises(ValueError, match="pass cluster_ids"):
        model(ids, positions, None)
    with pytest.raises(ValueError, match="pass cluster_ids"):
        model(ids, positions, None, cluster_ids=[0, 1, 2], mixture=[1.0, 0, 0, 0])
    with pytest.raises(ValueError, match="mixture of 3 cluster weights"):
        model(ids, positions, None, mixture=[1.0, 0, 0])


# -- sampling -----------------------------------------------------------------------------------

def draws(per="micro_batch", concentration=1.0, one_hot_share=0.25, seed=7):
    from megatron_pn.mixture import MixtureDraws

    cfg = load_config([PN_CONFIG], [f"data.mixture={per}", f"train.seed={seed}",
                                    f"data.mixture_concentration={concentration}",
                                    f"data.mixture_one_hot={one_hot_share}"])
    # five datasets of four clusters (cluster 1 split over two), shares 0.1 .. 0.4
    return MixtureDraws(cfg, [1.0, 1.0, 1.0, 3.0, 4.0], [0, 1, 1, 2, 3], num_units=4)


def test_mixture_sampling_follows_the_drawn_weights():
    """Each unit's rows are multinomial in w (over datasets: w of the cluster x the dataset's
    share of it): Pearson's statistic over all units is chi-square with sum(cells - 1) dof."""
    d = draws()
    statistic, dof, weights = 0.0, 0, []
    for step in range(400):
        unit_weights, datasets = d.step(step, rows=64)
        for w, rows in zip(unit_weights, np.split(datasets, 4)):
            chance = w[d.dataset_cluster] * d.in_cluster
            cells = chance > 0
            expected = 16 * chance[cells]
            observed = np.bincount(rows, minlength=5)[cells]
            assert observed.sum() == 16  # no row from a dataset of weight 0
            statistic += ((observed - expected) ** 2 / expected).sum()
            dof += cells.sum() - 1
            weights.append(w)
    assert 1e-3 < stats.chi2.sf(statistic, dof) < 1 - 1e-3, (statistic, dof)
    weights = np.array(weights)
    assert np.allclose(weights.sum(axis=1), 1.0)
    # E[w] = p, the clusters' shares of the blend: hard routing's data mix on average
    assert np.allclose(weights.mean(axis=0), [0.1, 0.2, 0.3, 0.4], atol=0.03)
    one_hot_draws = (weights.max(axis=1) == 1.0).mean()
    assert 0.2 < one_hot_draws < 0.3  # data.mixture_one_hot = 0.25


def test_concentration_moves_mixtures_between_one_cluster_and_the_blend():
    def spread(concentration):
        d = draws(concentration=concentration, one_hot_share=0.0)
        w = np.concatenate([d.step(s, rows=64)[0] for s in range(100)])
        return np.abs(w - [0.1, 0.2, 0.3, 0.4]).sum(axis=1).mean()
    assert spread(100.0) < 0.2 < spread(0.1)


def test_a_resumed_sampler_reads_exactly_the_same_batches():
    from megatron_pn.mixture import MixtureSampler

    def batches(start, dp_rank=0, dp_size=1):  # 16 rows a step, 4 micro-batches = 4 units
        sampler = MixtureSampler(draws(), [50, 7, 9, 30, 40], start, 12, 16, 4, dp_rank, dp_size)
        return list(sampler)
    straight = batches(0)
    assert len(straight) == 12 * 4 and batches(5) == straight[5 * 4:]
    # data-parallel ranks split each step's rows: together they read the one-rank batches
    halves = [batches(0, r, 2) for r in range(2)]
    by_step = [halves[0][s * 2:(s + 1) * 2] + halves[1][s * 2:(s + 1) * 2] for s in range(12)]
    assert [b for step in by_step for b in step] == straight
    # cursors walk each dataset in order and wrap around at its end
    seen = [key for batch in straight for key in batch if key[0] == 1]
    assert [index for _, index, _ in seen][:10] == [i % 7 for i in range(10)]
    # one mixture per unit: each micro-batch has its own weights, the same for all its rows
    assert all(len({key[2] for key in batch}) == 1 for batch in straight)
    assert len({batch[0][2] for batch in straight[:4]}) == 4


# -- training -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def clusters(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixture")
    return write_cluster_datasets(root / "data"), root


MIXTURE = {"data.split": "80,20,0", "data.mixture": "micro_batch", "model.code_map": "learned",
           "train.steps": 6}


@pytest.mark.slow
def test_mixture_training_layouts_and_resume_reproduce_the_single_process_curve(clusters):
    """DP2 x PP2 with the distributed optimizer (each DP rank its slice of the step's rows, the
    learned map replicated on both stages), and a run stopped and resumed mid-way."""
    blend, root = clusters
    init = root / "init"
    run_train([PN_CONFIG, *tiny_pn_overrides(blend, root / "init_run", **{
        **MIXTURE, "train.steps": 0, "checkpoint.dir": init})])

    def run(name, nproc=1, **extra):
        run_dir = root / name
        args = [PN_CONFIG, *tiny_pn_overrides(blend, run_dir, **{
            **MIXTURE, "checkpoint.load": init, "checkpoint.dir": run_dir / "ckpt", **extra})]
        run_train(args, nproc=nproc)
        return run_dir, args
    single, _ = run("single")
    assert len(losses(single)) == 6 and losses(single)[-1] < losses(single)[0]
    layout, _ = run("dp2_pp2", 4, **{"parallel.pipeline": 2,
                                     "parallel.distributed_optimizer": "true"})
    assert losses(layout) == pytest.approx(losses(single), rel=1e-5)
    resumed, args = run("resumed", **{"train.exit_after_steps": 3})
    assert max(read_metrics(resumed)) == 3
    run_train(args)
    assert losses(resumed) == losses(single)


@pytest.mark.parametrize("override,message", [
    ("data.mixture=always", "data.mixture: 'always' is not one of none, step, micro_batch"),
    ("model.code_map=mlp", "model.code_map must be linear or learned"),
    ("data.mixture_one_hot=1.5", "data.mixture_one_hot: must be in [0, 1]"),
    ("data.mixture_concentration=0", "data.mixture_concentration: must be > 0"),
    ("data.group_by_cluster=true", "data.group_by_cluster: a mixture micro-batch has one code"),
])
def test_bad_mixture_settings_fail_with_one_line(clusters, tmp_path, capsys, override, message):
    blend, _ = clusters
    args = [PN_CONFIG, *tiny_pn_overrides(blend, tmp_path / "run", **{"data.mixture": "step"}),
            override]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and not (tmp_path / "run").exists()


def test_mixture_training_is_for_projected_networks(clusters, tmp_path, capsys):
    blend, _ = clusters
    args = ["configs/tiny/cond.yaml", *tiny_pn_overrides(blend, tmp_path / "run"),
            "data.mixture=step"]
    assert main(args) == 2
    assert "mixture training is for model.type pn, not cond" in capsys.readouterr().err


def test_a_mixture_trained_checkpoint_becomes_an_ordinary_dense_checkpoint(clusters, tmp_path,
                                                                           capsys):
    """pn-project --histogram FILE (the histogram alone) on a mixture-trained PN with a learned
    map: a dense checkpoint that pn-eval reads as any dense model (its config draws no
    mixtures), holding the model of the histogram's code."""
    import json

    from helpers import write_model_checkpoint
    from megatron_pn import checkpoint
    from megatron_pn.cli.evaluate import main as pn_eval
    from megatron_pn.cli.project import main as pn_project

    blend, root = clusters
    ckpt = write_model_checkpoint(tmp_path / "pn", [PN_CONFIG], tiny_pn_overrides(
        blend, tmp_path / "unused", **{**MIXTURE, "train.steps": 0}))
    histogram = tmp_path / "histogram.json"
    histogram.write_text(json.dumps({"k": 4, "tokens": [5, 0, 3, 2], "centroids_sha256": "ab"}))
    out = tmp_path / "instant"
    assert pn_project(["--checkpoint", str(ckpt), "--histogram", str(histogram), "--strategy",
                       "histogram", "--output", str(out)]) == 0
    saved = checkpoint.saved_config(out)
    assert saved.model.type == "dense" and saved.data.mixture == "none"
    assert json.loads((out / "projection.json").read_text())["weights"] == [0.5, 0.0, 0.3, 0.2]
    prefix = json.loads(blend.read_text())["blend"][0][1]
    assert pn_eval(["--checkpoint", str(out), "--data", prefix, "--max-tokens", "2000",
                    "--quiet"]) == 0
    assert "perplexity" in capsys.readouterr().out
