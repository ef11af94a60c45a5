"""Projected networks: the projection equals a dense expert, mixed micro-batches equal separate
per-cluster passes, gradients match autograd on the unsharded formula, init statistics, parallel
layouts reproduce the 1-process curve, resume is bit-exact, bad input is refused."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import (losses, read_metrics, run_train, tiny_pn_overrides, write_cluster_datasets)
from megatron_pn.config import load_config
from megatron_pn.cli.train import main

PN_CONFIG = "configs/tiny/pn.yaml"
SPLIT = {"data.split": "80,20,0"}


def build(cfg):
    from megatron_pn.model import build_gpt, transformer_config

    return build_gpt(cfg, transformer_config(cfg, "cpu")).eval()


def tiny_cfg(**overrides):
    values = {"model.vocab_size": 257, "model.num_experts": 4, "model.bank_size": 3,
              "model.code_size": 2, **overrides}
    return load_config([PN_CONFIG], [f"{k}={v}" for k, v in values.items()])


def inputs(batch=6, seq=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 257, (batch, seq), generator=g)
    positions = torch.arange(seq).expand(batch, seq)
    return tokens, positions


@pytest.mark.parametrize("project_attention", [False, True])
def test_projected_expert_is_a_dense_slm(world, project_attention):
    from megatron_pn.pn.projection import dense_state_dict

    cfg = tiny_cfg(**{"model.project_attention": str(project_attention).lower()})
    pn_model = build(cfg)
    dense_cfg = load_config(["configs/tiny/slm.yaml"], ["model.vocab_size=257"])
    dense = build(dense_cfg)
    tokens, positions = inputs()
    for expert in range(cfg.model.num_experts):
        dense.load_state_dict(dense_state_dict(pn_model, expert), strict=False)
        missing = set(dense.state_dict()) - set(dense_state_dict(pn_model, expert))
        assert all(k.endswith("_extra_state") for k in missing), missing
        ids = torch.full((len(tokens),), expert)
        with torch.no_grad():
            expected = pn_model(tokens, positions, None, cluster_ids=ids)
            got = dense(tokens, positions, None)
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max())


def test_projection_loads_every_weight_strictly(world):
    from megatron_pn.pn.projection import dense_state_dict
    from megatron_pn.specialize import load_every_weight

    dense = build(load_config(["configs/tiny/slm.yaml"], ["model.vocab_size=257"]))
    state = dense_state_dict(build(tiny_cfg()), 1)
    load_every_weight(dense, state)
    state.pop("decoder.layers.0.mlp.linear_fc2.weight")
    with pytest.raises(RuntimeError, match="missing.*linear_fc2"):
        load_every_weight(dense, state)


def per_token_loss_and_grads(model, tokens, positions, ids):
    loss = model(tokens, positions, None, labels=tokens, cluster_ids=ids).sum()
    model.zero_grad()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_mixed_cluster_micro_batch_equals_separate_passes(world):
    model = build(tiny_cfg()).train()
    tokens, positions = inputs(batch=6)
    ids = torch.tensor([0, 0, 2, 2, 2, 3])
    loss, grads = per_token_loss_and_grads(model, tokens, positions, ids)
    separate_loss, separate = 0.0, {}
    for cluster in (0, 2, 3):
        rows = ids == cluster
        part_loss, part = per_token_loss_and_grads(model, tokens[rows], positions[rows], ids[rows])
        separate_loss += part_loss
        for name, grad in part.items():
            separate[name] = separate.get(name, 0) + grad
    assert torch.allclose(loss, separate_loss, rtol=1e-5)
    for name, grad in grads.items():
        scale = grad.abs().max()
        assert torch.allclose(grad, separate[name], rtol=1e-4, atol=1e-5 * scale), name
    assert grads["expert_codes"][1].abs().sum() == 0  # expert 1 saw no data


@pytest.mark.parametrize("batch_first", [False, True])
def test_gradients_match_autograd_of_the_unsharded_formula(world, batch_first):
    from megatron_pn.pn.layers import ExpertRouting

    model = build(tiny_cfg()).train()
    mlp = model.decoder.layers[0].mlp
    fc1 = mlp.linear_fc1
    x = torch.randn(5, 4, 64, requires_grad=True)  # [s, b, d]
    ids = torch.tensor([1, 1, 3, 3])
    routing = ExpertRouting.from_cluster_ids(ids, model.codes, 4, torch.device("cpu"))
    with fc1.routed(routing, batch_first):
        y, _ = fc1(x.transpose(0, 1) if batch_first else x)
    y = y.transpose(0, 1) if batch_first else y
    upstream = torch.randn_like(y)
    params = [model.expert_codes, fc1.code_projection, fc1.bank]
    got = torch.autograd.grad((y * upstream).sum(), [x, *params])

    # The paper's equation, written directly: W[i][a,b] = sum_q sum_r E[i,q] M[q,r] T[a,b,r]
    E, M, T = (p.detach().clone().requires_grad_() for p in params)
    x_ref = x.detach().clone().requires_grad_()
    W = torch.einsum("iq,qr,abr->iab", E, M, T)
    y_ref = torch.stack([x_ref[:, b] @ W[int(ids[b])].T for b in range(4)], dim=1)
    expected = torch.autograd.grad((y_ref * upstream).sum(), [x_ref, E, M, T])
    assert torch.allclose(y, y_ref, rtol=1e-5, atol=1e-6)
    for g, e, name in zip(got, expected, ["x", "E", "M", "T"]):
        assert torch.allclose(g, e, rtol=1e-4, atol=1e-6), name


ON_GPU = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU")])


@pytest.mark.parametrize("device", ["cpu", ON_GPU])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("once_per_step", [False, True])
def test_grouped_gemm_equals_the_loop(world, monkeypatch, device, dtype, once_per_step):
    """train.pn_grouped_gemm=grouped (one torch._grouped_mm per linear over the rows sorted by
    expert) computes what the loop of one GEMM per expert does: the output, and every gradient
    - the input's, W's (the step's leaves, projected once per step) and through W the bank's,
    the code projection's and the codes' - over two micro-batches of mixed clusters, per
    micro-batch or projected once per step, under a broadcast upstream gradient too (`.sum()`:
    torch's grouped backward rejects it as it comes, so grouped_linear makes it row-major).
    Runs on CPU (torch 2.13: forward and backward in fp32 and bf16, CPU kernels; the outputs
    and input gradients came out bitwise equal there) and, where there is one, on a GPU (the
    CUDA kernels; bf16 tolerances)."""
    from megatron_pn.pn.layers import ExpertRouting, ProjectedWeights

    calls = []
    grouped_mm = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm",
                        lambda *a, **k: calls.append(1) or grouped_mm(*a, **k))
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2,
                                                                            "atol": 1e-3}
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(4, 5, 64, generator=g) for _ in range(2)]  # [b, s, d], batch-first
    upstream = torch.randn(4, 5, 352, generator=g)
    results = {}
    for mode in ("loop", "grouped"):
        model = build(tiny_cfg(**{"train.pn_grouped_gemm": mode})).train().to(device, dtype)
        fc1 = model.decoder.layers[0].mlp.linear_fc1
        projected = ProjectedWeights(model.codes, micro_batches=2) if once_per_step else None
        xs = [x.to(device, dtype).requires_grad_() for x in inputs]
        outputs, w_grads = [], None
        for step, (x, ids) in enumerate(zip(xs, ([0, 0, 2, 3], [1, 3, 3, 3]))):
            routing = ExpertRouting.from_cluster_ids(torch.tensor(ids), model.codes, 4, x.device)
            routing = projected.route(routing) if projected else routing
            with fc1.routed(routing, batch_first=True):
                y, _ = fc1(x)
            # the first micro-batch's upstream gradient broadcast, the second's row-major
            (y.sum() if step == 0 else (y * upstream.to(device, dtype)).sum()).backward()
            outputs.append(y.detach())
            if projected and step == 0:  # dL/dW of the first micro-batch, in the step's leaves
                w_grads = [w.grad.clone() for w in projected._weights[fc1].values()]
        params = [model.expert_codes, fc1.code_projection, fc1.bank]
        results[mode] = (outputs, [x.grad for x in xs], w_grads, [p.grad for p in params])
        assert calls if mode == "grouped" else not calls
    (outputs, x_grads, w_grads, grads), expected = results["grouped"], results["loop"]
    for got, want in zip(outputs + x_grads, expected[0] + expected[1]):
        assert torch.allclose(got.float(), want.float(), **tolerance)
    if once_per_step:
        for got, want in zip(w_grads, expected[2]):
            assert torch.allclose(got.float(), want.float(), **tolerance), "W"
    for got, want, name in zip(grads, expected[3], ["E", "M", "T"]):
        scale = want.abs().max()
        assert torch.allclose(got.float(), want.float(), rtol=tolerance["rtol"],
                              atol=tolerance["atol"] * scale), name


def test_grouped_gemm_runs_by_default_only_on_hopper_in_bf16():
    """auto (the default) groups on a GPU of compute capability >= 9.0 in bf16, where the CUTLASS
    grouped kernels are; elsewhere the loop (on CPU a training step was no faster grouped:
    benchmarks/RESULTS.md); grouped and loop force a path; shapes off torch's 16-byte alignment
    keep the loop."""
    from megatron_pn.compat import grouped_gemm, grouped_gemm_fits

    cpu = torch.device("cpu")
    assert not grouped_gemm("auto", cpu, torch.bfloat16)
    assert not grouped_gemm("auto", cpu, torch.float32)
    assert grouped_gemm("grouped", cpu, torch.float32) and not grouped_gemm("loop", cpu,
                                                                          torch.float32)
    if torch.cuda.is_available():
        gpu = torch.device("cuda", torch.cuda.current_device())
        hopper = torch.cuda.get_device_capability(gpu) >= (9, 0)
        assert grouped_gemm("auto", gpu, torch.bfloat16) == hopper
        assert not grouped_gemm("auto", gpu, torch.float32)
    assert grouped_gemm_fits(64, 352, torch.float32) and grouped_gemm_fits(64, 8, torch.bfloat16)
    assert not grouped_gemm_fits(64, 6, torch.float32)
    assert not grouped_gemm_fits(4, 8, torch.bfloat16)


def test_rows_in_any_order_equal_rows_grouped_by_cluster(world):
    """The model groups rows itself: a shuffled micro-batch gives the same per-row losses (in
    the caller's order), logits and gradients as the same rows sorted by cluster."""
    model = build(tiny_cfg()).train()
    tokens, positions = inputs(batch=7)
    ids = torch.tensor([3, 0, 2, 0, 3, 1, 2])
    order = torch.argsort(ids, stable=True)
    loss, grads = per_token_loss_and_grads(model, tokens, positions, ids.tolist())
    sorted_loss = model(tokens[order], positions[order], None, labels=tokens[order],
                        cluster_ids=ids[order])
    model.zero_grad()
    sorted_loss.sum().backward()
    row_loss = model(tokens, positions, None, labels=tokens, cluster_ids=ids)
    assert torch.allclose(row_loss[order], sorted_loss, rtol=1e-5, atol=1e-6)
    assert torch.allclose(loss, sorted_loss.sum(), rtol=1e-5)
    for name, parameter in model.named_parameters():
        scale = parameter.grad.abs().max()
        assert torch.allclose(grads[name], parameter.grad, rtol=1e-4, atol=1e-6 * scale), name
    with torch.no_grad():
        logits = model(tokens, positions, None, cluster_ids=ids)
        sorted_logits = model(tokens[order], positions[order], None, cluster_ids=ids[order])
    assert torch.allclose(logits[order], sorted_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("once_per_step", [False, True])
def test_bank_gradient_accumulates_into_ddp_main_grad(world, monkeypatch, once_per_step):
    """Under megatron-core's DDP the bank gradient is added into `main_grad` in place, over
    micro-batches, and equals autograd's gradient of the same micro-batches - also when each
    expert is projected once for the whole step and backpropagated once, in the backward of
    its last micro-batch."""
    import contextlib

    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron_pn.pn import projected_once
    from megatron_pn.pn.layers import ProjectedLinear

    cfg = tiny_cfg()
    plain = build(cfg).train()
    wrapped = build(cfg).train()
    wrapped.load_state_dict(plain.state_dict())
    ddp = DistributedDataParallel(wrapped.config, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True), wrapped)
    ddp.zero_grad_buffer()
    projections = []
    project = ProjectedLinear.project
    monkeypatch.setattr(ProjectedLinear, "project",
                        lambda self, codes: projections.append(len(codes)) or project(self, codes))
    scope = projected_once([ddp], micro_batches=2) if once_per_step else contextlib.nullcontext()
    with scope:
        for seed, ids in enumerate(([0, 2, 2, 3, 1, 0], [1, 1, 3, 0, 2, 2])):  # 2 micro-batches
            tokens, positions = inputs(seed=seed)
            for model in (plain, ddp):
                model(tokens, positions, None, labels=tokens, cluster_ids=ids).sum().backward()
    linears = 2 * cfg.model.num_layers
    # plain: once per linear and micro-batch; DDP: the same, or once per linear and step
    assert len(projections) == 2 * linears + (1 if once_per_step else 2) * linears
    assert wrapped.projected_weights is None
    for name, parameter in plain.named_parameters():
        main_grad = dict(wrapped.named_parameters())[name].main_grad
        scale = parameter.grad.abs().max()
        assert torch.allclose(main_grad, parameter.grad, rtol=1e-4, atol=1e-6 * scale), name
    bank = wrapped.decoder.layers[0].mlp.linear_fc1.bank
    assert bank.grad_added_to_main_grad and bank.grad is None


def test_evaluation_projects_each_expert_once(world, monkeypatch):
    """projected_once without micro-batches (validation, pn-eval): the same outputs, each expert's
    weights projected once for all batches, and no graph kept."""
    from megatron_pn.pn import projected_once
    from megatron_pn.pn.layers import ProjectedLinear

    model = build(tiny_cfg())
    batches = [(inputs(seed=seed), ids) for seed, ids in enumerate(([0, 2, 2, 3, 1, 0],
                                                                    [1, 1, 3, 0, 2, 2]))]
    with torch.no_grad():
        expected = [model(t, p, None, cluster_ids=ids) for (t, p), ids in batches]
        projections = []
        project = ProjectedLinear.project
        monkeypatch.setattr(ProjectedLinear, "project", lambda self, codes: projections.append(
            len(codes)) or project(self, codes))
        with projected_once([model]):
            got = [model(t, p, None, cluster_ids=ids) for (t, p), ids in batches]
    for a, b in zip(got, expected):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    assert len(projections) == 2 * tiny_cfg().model.num_layers  # once per linear
    assert model.projected_weights is None


@pytest.mark.parametrize("code_init", ["random", "shared"])
def test_every_projected_expert_has_the_dense_init_std(world, code_init):
    from megatron_pn.pn.projection import dense_state_dict

    cfg = tiny_cfg(**{"model.num_experts": 8, "model.bank_size": 6, "model.code_size": 4,
                      "model.hidden_size": 128, "model.ffn_hidden_size": 512,
                      "model.code_init": code_init})
    model = build(cfg)
    std = cfg.model.init_method_std
    for expert in range(8):
        state = dense_state_dict(model, expert)
        for layer in range(cfg.model.num_layers):
            fc1 = state[f"decoder.layers.{layer}.mlp.linear_fc1.weight"]
            fc2 = state[f"decoder.layers.{layer}.mlp.linear_fc2.weight"]
            assert fc1.std().item() == pytest.approx(std, rel=0.03)
            assert fc2.std().item() == pytest.approx(std / math.sqrt(2 * 4), rel=0.03)


def test_projected_linear_initializes_itself_from_its_spec(world):
    """Built alone from its spec parameters (no parent layer), a projected linear holds the same
    seeded weights as its twin in the model: seeded by (global layer, name), never left empty."""
    from megatron_pn.families.pn import pn_config
    from megatron_pn.model import transformer_config
    from megatron_pn.pn.layers import PNColumnParallelLinear

    cfg = tiny_cfg()
    tconfig = transformer_config(cfg, "cpu")
    model = build(cfg)
    in_model = model.decoder.layers[1].mlp.linear_fc1  # global layer 2
    alone = PNColumnParallelLinear(
        tconfig.hidden_size, in_model.full_shape[0], config=tconfig, init_method=None,
        pn=pn_config(cfg), init_key=("layer", 2, "mlp.linear_fc1"),
        stride=2 if tconfig.gated_linear_unit else 1)
    assert torch.equal(alone.bank, in_model.bank)
    assert torch.equal(alone.code_projection, in_model.code_projection)
    assert not torch.equal(model.decoder.layers[0].mlp.linear_fc1.bank, in_model.bank)


def expert_distances(model, k) -> torch.Tensor:
    """||W_i - W_j|| / ||W_i|| of layer 0's fc1 for every pair of experts."""
    from megatron_pn.pn.projection import dense_state_dict

    key = "decoder.layers.0.mlp.linear_fc1.weight"
    weights = torch.stack([dense_state_dict(model, i)[key].flatten() for i in range(k)])
    return torch.cdist(weights, weights) / weights.norm(dim=1, keepdim=True)


def test_shared_code_init_starts_experts_close_but_distinct(world):
    """code_init=shared: experts start near one network (random codes: unrelated experts), are
    identical with a spread of 0, and still get distinct gradients from their clusters."""
    k = 4
    distance = {init: expert_distances(build(tiny_cfg(**{"model.code_init": init})), k)
                for init in ("random", "shared")}
    off_diagonal = ~torch.eye(k, dtype=torch.bool)
    assert distance["shared"][off_diagonal].max() < 0.3
    assert distance["random"][off_diagonal].mean() > 0.7
    same = build(tiny_cfg(**{"model.code_init": "shared", "model.code_init_spread": 0}))
    assert expert_distances(same, k).max() < 1e-6

    model = build(tiny_cfg(**{"model.code_init": "shared"})).train()
    tokens, positions = inputs(batch=4)
    _, grads = per_token_loss_and_grads(model, tokens, positions, [0, 1, 2, 3])
    code_grads = grads["expert_codes"]
    assert (code_grads.norm(dim=1) > 0).all()
    assert torch.cdist(code_grads, code_grads)[off_diagonal].min() > 1e-3 * code_grads.norm()


def test_bank_lr_mult_gives_the_banks_their_own_lr(world):
    """train.pn_bank_lr_mult: the banks' parameter group (megatron-core's optimizer, and the
    DeepSpeed engine's groups) has lr x mult for max_lr and min_lr; nothing else does."""
    from megatron_pn.engines import MegatronEngine, _param_groups
    from megatron_pn.model import build_model_chunks, transformer_config

    cfg = tiny_cfg(**{"train.pn_bank_lr_mult": 0.25, "train.lr": 1e-3, "train.min_lr": 1e-4})
    tconfig = transformer_config(cfg, "cpu")
    engine = MegatronEngine(cfg, tconfig, build_model_chunks(cfg, tconfig))
    banks = {id(p) for n, p in engine.model[0].named_parameters() if n.endswith(".bank")}
    deepspeed_groups = _param_groups(engine.model[0].module, cfg)
    for groups in (engine.optimizer.param_groups, deepspeed_groups):
        for group in groups:
            is_bank = {id(p) in banks for p in group["params"]}
            assert len(is_bank) == 1  # banks and other parameters are never in one group
            expected = (2.5e-4, 2.5e-5) if is_bank.pop() else (1e-3, 1e-4)
            assert (group.get("max_lr", 1e-3), group.get("min_lr", 1e-4)) == \
                pytest.approx(expected)


# -- multi-process training ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def clusters(tmp_path_factory):
    """(blend file, root): four per-cluster datasets as `pn-data cluster` writes them."""
    root = tmp_path_factory.mktemp("pn")
    return write_cluster_datasets(root / "data"), root


@pytest.fixture(scope="module")
def pn_reference(clusters):
    blend, root = clusters
    init = root / "init"
    run_train([PN_CONFIG, *tiny_pn_overrides(blend, root / "init_run", **SPLIT, **{
        "train.steps": 0, "checkpoint.dir": init})])

    def run(name, nproc, **extra):
        run_dir = root / name
        run_train([PN_CONFIG, *tiny_pn_overrides(blend, run_dir, **SPLIT, **{
            "train.steps": 6, "checkpoint.load": init, **extra})], nproc=nproc)
        return losses(run_dir)
    return run, run("single", 1)


@pytest.mark.slow
@pytest.mark.parametrize("name,nproc,extra", [
    ("tp2", 2, {"parallel.tensor": 2}),
    ("pp2_interleaved", 2, {"parallel.pipeline": 2, "parallel.virtual_pipeline": 2}),
    ("tp2_pp2_dp2_distopt", 8, {"parallel.tensor": 2, "parallel.pipeline": 2,
                                "parallel.distributed_optimizer": "true"}),
])
def test_pn_layouts_reproduce_single_process_curve(pn_reference, name, nproc, extra):
    run, single = pn_reference
    curve = run(name, nproc, **extra)
    assert len(curve) == 6 and single[-1] < single[0]
    assert curve == pytest.approx(single, rel=1e-5), f"{curve} != {single}"


@pytest.mark.slow
def test_grouping_micro_batches_by_cluster_keeps_the_curve(pn_reference):
    run, single = pn_reference
    grouped = run("grouped", 1, **{"data.group_by_cluster": "true"})
    assert grouped == pytest.approx(single, rel=1e-5)


@pytest.mark.slow
def test_slm_mix_expert_trains_on_its_cluster_only(clusters, tmp_path):
    blend, _ = clusters
    run_dir = tmp_path / "mix"
    run_train(["configs/tiny/mix.yaml", *tiny_pn_overrides(blend, run_dir, **SPLIT, **{
        "train.steps": 3, "data.expert": 2, "checkpoint.dir": tmp_path / "ckpt"})])
    assert len(losses(run_dir / "expert_0002")) == 3
    assert (tmp_path / "ckpt" / "expert_0002" / "latest_checkpointed_iteration.txt").is_file()


@pytest.mark.slow
def test_eval_sets_during_training_equal_pn_eval(clusters, tmp_path, capsys):
    """train.eval_sets: a held-out set evaluated with its expert at every eval_interval gives
    the NLL pn-eval computes on the checkpoint of the same step."""
    import json

    from megatron_pn.cli.evaluate import main as pn_eval

    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    blend, root = clusters
    prefix, run_dir, ckpt = root / "data" / "cluster_0001", tmp_path / "run", tmp_path / "ckpt"
    assign = tmp_path / "assign"  # as `pn-data assign` writes it: every window in cluster 2
    assign.mkdir()
    dataset = IndexedDataset(str(prefix))
    lengths = dataset.sequence_lengths.copy()  # (a view of the index: the dataset must live)
    np.save(assign / "windows.npy", np.array([[d, 0, n - 1] for d, n in enumerate(lengths)]))
    np.save(assign / "assignments.npy", np.full(len(lengths), 2, dtype=np.int32))
    run_train([PN_CONFIG, *tiny_pn_overrides(blend, run_dir, **SPLIT, **{
        "train.steps": 2, "train.eval_interval": 2,
        "train.eval_sets": f"[[c1,{prefix},2],[c1_routed,{prefix},{assign}]]",
        "train.eval_sets_max_tokens": 700, "checkpoint.dir": ckpt})])
    during = read_metrics(run_dir, "eval/c1")[2]
    assert read_metrics(run_dir, "eval/c1_routed")[2]["loss"] == during["loss"]
    out = tmp_path / "eval.json"
    assert pn_eval(["--checkpoint", str(ckpt), "--data", str(prefix), "--expert", "2",
                    "--max-tokens", "700", "--output", str(out), "--quiet"]) == 0
    after = json.loads(out.read_text())["datasets"][0]
    assert after["tokens"] == 700
    assert during["loss"] == pytest.approx(after["nll"], rel=1e-5)


def test_slm_mix_job_config(clusters, tmp_path):
    from megatron_pn.families import family_of

    blend, root = clusters
    cfg = load_config(["configs/tiny/mix.yaml"], tiny_pn_overrides(blend, tmp_path / "run", **{
        "data.expert": 1, "checkpoint.dir": tmp_path / "ckpt"}))
    job = family_of(cfg).job_config(cfg)
    assert [prefix for _, prefix in job.data.blend] == [str(root / "data" / "cluster_0001")]
    assert job.logging.run_dir.endswith("/expert_0001")
    assert job.checkpoint.dir.endswith("/expert_0001")
    with pytest.raises(ValueError, match=r"data.expert in \[0, model.num_experts = 4\)"):
        mix = load_config(["configs/tiny/mix.yaml"], tiny_pn_overrides(blend, tmp_path))
        family_of(mix).job_config(mix)


@pytest.mark.slow
def test_pn_resume_is_bit_exact(clusters, tmp_path):
    blend, _ = clusters
    def run(name, **extra):
        run_dir = tmp_path / name
        args = [PN_CONFIG, *tiny_pn_overrides(blend, run_dir, **SPLIT, **{
            "train.steps": 6, "checkpoint.dir": run_dir / "ckpt", **extra})]
        run_train(args)
        return run_dir, args
    reference, _ = run("reference")
    resumed, args = run("resumed", **{"train.exit_after_steps": 3})
    assert max(read_metrics(resumed)) == 3
    run_train(args)
    assert losses(resumed) == losses(reference)


# -- bad input ----------------------------------------------------------------------------------

def error_line(args, capsys) -> str:
    assert main(args) == 2
    return capsys.readouterr().err.strip()


@pytest.mark.parametrize("override,message", [
    ("model.code_size=5", "model.code_size (m) 5 must be in [1, model.bank_size 3]"),
    ("model.bank_size=0", "model.bank_size (h) must be >= 1"),
    ("model.num_experts=0", "model.num_experts must be >= 1"),
    ("model.code_init=orthogonal", "model.code_init must be random or shared"),
    ("train.eval_sets=[[a,prefix,9]]", "train.eval_sets: expert 9 of a outside"),
    ("train.eval_sets=[[a,prefix]]", "train.eval_sets: ['a', 'prefix'] should be [name, prefix, expert or assign dir]"),
    ("model.num_experts=2", "data.cluster_ids: [2, 3] outside [0, model.num_experts = 2)"),
    ("model.add_bias_linear=true", "model.type pn needs model.add_bias_linear=false"),
    ("model.ffn_hidden_size=90 parallel.tensor=4",
     "model.ffn_hidden_size 90 is not divisible by parallel.tensor 4"),
])
def test_pn_config_errors(clusters, tmp_path, capsys, override, message):
    blend, _ = clusters
    err = error_line([PN_CONFIG, *tiny_pn_overrides(blend, tmp_path / "run"), *override.split()],
                     capsys)
    assert message in err


def test_pn_without_cluster_ids_is_refused(clusters, tmp_path, capsys):
    blend, root = clusters
    prefix = root / "data" / "cluster_0000"
    err = error_line([PN_CONFIG, *tiny_pn_overrides(blend, tmp_path / "run"),
                      "data.blend_file=null", f"data.blend=[{prefix}]"], capsys)
    assert "needs the cluster id of every training sequence" in err


def rows_of(codes):
    """A code table: experts -> their rows of `codes`."""
    from megatron_pn.pn.layers import select_codes

    return lambda experts: select_codes(codes, experts)


def test_routing_rejects_bad_cluster_ids():
    from megatron_pn.pn.layers import ExpertRouting

    codes = rows_of(torch.randn(4, 2))
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="cluster id 4 is outside"):
        ExpertRouting.from_cluster_ids(torch.tensor([0, 4]), codes, 4, cpu)
    with pytest.raises(ValueError, match="cluster id -1 is outside"):
        ExpertRouting.from_cluster_ids(torch.tensor([-1, 0]), codes, 4, cpu)
    with pytest.raises(ValueError, match="must be on the host"):
        ExpertRouting.from_cluster_ids(torch.tensor([0, 1], device="meta"), codes, 4, cpu)


def test_routing_groups_rows_on_the_host():
    from megatron_pn.pn.layers import ExpertRouting

    codes, cpu = torch.randn(4, 2), torch.device("cpu")
    routing = ExpertRouting.from_cluster_ids([2, 0, 2, 1, 0], rows_of(codes), 4, cpu)
    assert routing.experts == (0, 1, 2) and routing.counts == (2, 1, 2)
    assert routing.order.tolist() == [1, 4, 3, 0, 2]
    rows = torch.arange(5) * 10
    assert routing.group(rows).tolist() == [10, 40, 30, 0, 20]
    assert routing.ungroup(routing.group(rows)).tolist() == rows.tolist()
    assert torch.equal(routing.codes, codes[[0, 1, 2]])
    already_grouped = ExpertRouting.from_cluster_ids(torch.tensor([1, 1, 3]), rows_of(codes), 4,
                                                     cpu)
    assert already_grouped.order is None and already_grouped.group(rows) is rows
