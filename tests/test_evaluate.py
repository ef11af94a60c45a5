"""pn-eval: windows predict every token once, known NLLs (a unigram model), the macro-average,
equality with the trainer's per-token loss on the same windows, determinism, PN routing by
expert and by cluster, bad input. In-process (a gloo world of one); checkpoints are written
in-process too."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from helpers import perturbed_model as build
from helpers import EOD, real_text_documents, write_byte_dataset
from megatron_pn.config import load_config
from megatron_pn.cli.evaluate import main
from megatron_pn.evaluate import document_windows

SLM, PN = "configs/tiny/slm.yaml", "configs/tiny/pn.yaml"
GPT2_STYLE = ["model.activation=gelu", "model.normalization=LayerNorm",
              "model.position_embedding_type=learned_absolute"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two byte-level held-out sets of real text with different token histograms (and a small
    one for the slow per-window references); each has an empty document and a one-byte one."""
    root = tmp_path_factory.mktemp("eval_data")
    docs = [d[:500] for d in real_text_documents(60_000)][:20] + ["", "x"]
    return {"lower": write_byte_dataset(root / "lower", [d.lower() for d in docs]),
            "upper": write_byte_dataset(root / "upper", [d.upper() for d in docs]),
            "small": write_byte_dataset(root / "small", docs[:5] + ["", "x"]), "root": root}


def config(path=SLM, *overrides):
    return load_config([path], ["model.vocab_size=257", "data.eod_id=256", *overrides])


def save(model, cfg, path):
    from megatron_pn.hf import write_checkpoint

    return write_checkpoint(model, cfg, path)


def run_eval(args, capsys, tmp_path, name="out.json"):
    out = tmp_path / name
    assert main([*map(str, args), "--output", str(out), "--quiet", "--overwrite"]) == 0
    return json.loads(out.read_text()), capsys.readouterr().out


def documents(prefix) -> list[np.ndarray]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix), mmap=True)
    return [ds[i].astype(np.int64) for i in range(len(ds))]


# -- windows ------------------------------------------------------------------------------------

def test_windows_predict_every_token_exactly_once():
    lengths = np.array([0, 1, 5, 64, 65, 130, 0])
    windows = document_windows(lengths, 64, None)
    for doc, n in enumerate(lengths):
        mine = windows[windows[:, 0] == doc]
        covered = np.concatenate([np.arange(a, a + k) for _, a, k in mine] or [[]])
        assert covered.tolist() == list(range(n))
    assert windows[:, 2].max() <= 64
    cut = document_windows(lengths, 64, 100)
    assert cut[:, 2].sum() == 100 and cut.tolist() == [[1, 0, 1], [2, 0, 5], [3, 0, 64],
                                                        [4, 0, 30]]


# -- known answers ------------------------------------------------------------------------------

def unigram_model(q: torch.Tensor):
    """A GPT-2-style model whose logits are log q at every position: all weights zero, so the
    final LayerNorm outputs its bias e_0, and the output layer's column 0 is log q."""
    cfg = config(SLM, *GPT2_STYLE, "model.tie_embeddings=false")
    model = build(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.decoder.final_layernorm.bias[0] = 1.0
        model.output_layer.weight[:, 0] = q.log()
    return model, cfg


def test_known_nll_and_macro_average_of_a_unigram_model(world, data, tmp_path, capsys):
    g = torch.Generator().manual_seed(1)
    q = torch.rand(384, generator=g, dtype=torch.float64) + 0.1
    q = (q / q.sum()).float()
    model, cfg = unigram_model(q)
    ckpt = save(model, cfg, tmp_path / "ckpt")
    report, table = run_eval(["--checkpoint", ckpt, "--data", f"{data['lower']},{data['upper']}",
                              "--names", "lower,upper", "--batch-size", 3], capsys, tmp_path)
    nll = {}
    for name in ("lower", "upper"):
        tokens = np.concatenate(documents(data[name]))  # every token, EOD included
        nll[name] = float(-np.log(q.double().numpy()[tokens]).mean())
        got = next(r for r in report["datasets"] if r["name"] == name)
        assert got["tokens"] == len(tokens)
        assert got["nll"] == pytest.approx(nll[name], rel=1e-6)
        # the standard error over windows (the samples), from their NLL sums by hand
        sums, sizes = [], []
        for doc in documents(data[name]):
            for a in range(0, len(doc), cfg.model.seq_length):
                window = doc[a:a + cfg.model.seq_length]
                sums.append(-np.log(q.double().numpy()[window]).sum())
                sizes.append(len(window))
        sums, sizes = np.array(sums), np.array(sizes)
        mean = sums.sum() / sizes.sum()
        stderr = np.sqrt(((sums - mean * sizes) ** 2).sum() / (len(sums) * (len(sums) - 1)))
        assert got["stderr"] == pytest.approx(stderr / sizes.mean(), rel=1e-5)
        assert got["ppl"] == pytest.approx(math.exp(nll[name]), rel=1e-6)
    assert nll["lower"] != pytest.approx(nll["upper"], rel=1e-3)  # the domains differ
    macro = (nll["lower"] + nll["upper"]) / 2
    assert report["macro_average"]["nll"] == pytest.approx(macro, rel=1e-6)
    assert report["macro_average"]["ppl"] == pytest.approx(math.exp(macro), rel=1e-6)
    assert "| macro-average | |" in table and "| lower |" in table


def per_window_reference(model, prefix, seq, cluster_of=None) -> float:
    """Mean per-token loss of the model (its forward with labels, as the trainer computes it),
    one window at a time, windows built here independently: ([EOD] + doc)[a:a+s] -> doc[a:a+s]."""
    total, count = 0.0, 0
    for doc, tokens in enumerate(documents(prefix)):
        context = np.concatenate([[EOD], tokens])
        for a in range(0, len(tokens), seq):
            labels = torch.from_numpy(tokens[a:a + seq])[None]
            inputs = torch.from_numpy(context[a:a + labels.shape[1]])[None]
            positions = torch.arange(inputs.shape[1])[None]
            routing = {} if cluster_of is None else {
                "cluster_ids": torch.tensor([cluster_of(doc, a, len(tokens))])}
            with torch.no_grad():
                loss = model(inputs, positions, None, labels=labels, **routing)
            total += float(loss.double().sum())
            count += labels.numel()
    return total / count


def test_nll_equals_the_trainer_loss_on_the_same_windows_and_is_deterministic(
        world, data, tmp_path, capsys):
    cfg = config()
    model = build(cfg, seed=3)
    ckpt = save(model, cfg, tmp_path / "ckpt")
    args = ["--checkpoint", ckpt, "--data", data["small"], "--batch-size", 5]
    first, _ = run_eval(args, capsys, tmp_path, "a.json")
    second, _ = run_eval(args, capsys, tmp_path, "b.json")
    assert first == second  # bit-identical
    expected = per_window_reference(model, data["small"], cfg.model.seq_length)
    assert first["datasets"][0]["nll"] == pytest.approx(expected, rel=1e-5)
    assert first["iteration"] == 0 and first["model_type"] == "dense"


# -- PN -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pn_checkpoint(world, tmp_path_factory):
    cfg = config(PN, "model.num_experts=4", "model.bank_size=3", "model.code_size=2")
    model = build(cfg, seed=5)
    return model, cfg, save(model, cfg, tmp_path_factory.mktemp("pn") / "ckpt")


def test_pn_expert_equals_its_projected_dense_model(pn_checkpoint, data, tmp_path, capsys):
    from megatron_pn.pn.projection import dense_state_dict

    pn_model, pn_cfg, pn_ckpt = pn_checkpoint
    cfg = config()
    dense = build(cfg)
    dense.load_state_dict(dense_state_dict(pn_model, 2), strict=False)
    dense_ckpt = save(dense, cfg, tmp_path / "dense")
    common = ["--data", data["upper"], "--max-tokens", 3000]
    pn, _ = run_eval(["--checkpoint", pn_ckpt, "--expert", 2, *common], capsys, tmp_path)
    projected, _ = run_eval(["--checkpoint", dense_ckpt, *common], capsys, tmp_path)
    assert pn["expert"] == 2 and pn["datasets"][0]["tokens"] == 3000
    assert pn["datasets"][0]["nll"] == pytest.approx(projected["datasets"][0]["nll"], rel=1e-5)


def write_assignments(directory, prefix, context=100, k=3):
    """An `pn-data assign`-like directory: windows of `context` content tokens (EOD excluded),
    the cluster of window (doc, start) = (doc + start // context) % k."""
    rows = [(doc, s, min(s + context, len(t) - 1))
            for doc, t in enumerate(documents(prefix)) for s in range(0, len(t) - 1, context)]
    windows = np.array(rows, dtype=np.int64).reshape(-1, 3)
    directory.mkdir()
    np.save(directory / "windows.npy", windows)
    np.save(directory / "assignments.npy",
            ((windows[:, 0] + windows[:, 1] // context) % k).astype(np.int32))
    return directory


def test_pn_cluster_ids_from_assignments(pn_checkpoint, data, tmp_path, capsys):
    model, cfg, ckpt = pn_checkpoint
    assign = write_assignments(tmp_path / "assign", data["small"])
    most_frequent = np.bincount(np.load(assign / "assignments.npy")).argmax()

    def cluster_of(doc, a, length):  # the assign window holding token a (its EOD: the last)
        content = length - 1
        if content == 0:
            return most_frequent  # an empty document got no window
        return (doc + min(a, content - 1) // 100) % 3

    report, _ = run_eval(["--checkpoint", ckpt, "--data", data["small"], "--cluster-ids-from",
                          assign, "--batch-size", 4], capsys, tmp_path)
    expected = per_window_reference(model, data["small"], cfg.model.seq_length, cluster_of)
    assert report["datasets"][0]["nll"] == pytest.approx(expected, rel=1e-5)
    assert report["cluster_ids_from"] == [str(assign)]


def test_batch_of_one_cluster_evaluations_pools_to_the_routed_set(pn_checkpoint, data,
                                                                   dense_checkpoint, tmp_path,
                                                                   capsys):
    """--batch runs many evaluations in one process; --only-cluster I keeps cluster I's windows
    (computed by expert I): pooled over the clusters they are the routed whole set."""
    _, _, ckpt = pn_checkpoint
    assign = write_assignments(tmp_path / "assign", data["small"])
    whole, _ = run_eval(["--checkpoint", ckpt, "--data", data["small"], "--cluster-ids-from",
                         assign], capsys, tmp_path)
    jobs = [{"checkpoint": str(ckpt), "data": str(data["small"]), "output":
             str(tmp_path / f"c{e}.json"), "cluster_ids_from": str(assign), "only_cluster": e}
            for e in range(3)]
    jobs.append({"checkpoint": str(dense_checkpoint), "data": str(data["small"]),
                 "output": str(tmp_path / "dense.json"), "max_tokens": 500})
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    assert main(["--batch", str(tmp_path / "jobs.json")]) == 0
    parts = [json.loads((tmp_path / f"c{e}.json").read_text())["datasets"][0] for e in range(3)]
    assert all(p["tokens"] > 0 for p in parts)
    assert sum(p["tokens"] for p in parts) == whole["datasets"][0]["tokens"]
    pooled = sum(p["nll"] * p["tokens"] for p in parts) / sum(p["tokens"] for p in parts)
    assert pooled == pytest.approx(whole["datasets"][0]["nll"], rel=1e-6)
    assert json.loads((tmp_path / "dense.json").read_text())["datasets"][0]["tokens"] == 500
    # a re-run skips finished evaluations
    (tmp_path / "dense.json").write_text("{}")
    assert main(["--batch", str(tmp_path / "jobs.json")]) == 0
    assert (tmp_path / "dense.json").read_text() == "{}"
    # a cluster absent from the set: 0 tokens, no NLL; a failing job does not stop the others
    more = [{**jobs[0], "only_cluster": 3, "output": str(tmp_path / "c3.json")},
            {**jobs[3], "expert": 1, "output": str(tmp_path / "wrong.json")},
            {**jobs[3], "output": str(tmp_path / "after.json")}]
    (tmp_path / "more.json").write_text(json.dumps(more))
    assert main(["--batch", str(tmp_path / "more.json")]) == 2
    absent = json.loads((tmp_path / "c3.json").read_text())["datasets"][0]
    assert (absent["tokens"], absent["nll"]) == (0, None)
    assert not (tmp_path / "wrong.json").exists() and (tmp_path / "after.json").exists()
    assert "wrong.json: expert routing (--expert, --cluster-ids-from) applies to PN" in \
        capsys.readouterr().err
    (tmp_path / "bad.json").write_text(json.dumps([{**jobs[0], "expertt": 1}]))
    assert "entry 0 needs checkpoint, data and output and only pn-eval options (unknown: " \
           "['expertt'])" in error_of(["--batch", tmp_path / "bad.json"], capsys)


# -- bad input ----------------------------------------------------------------------------------

def error_of(args, capsys) -> str:
    assert main([str(a) for a in args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.fixture(scope="module")
def dense_checkpoint(world, tmp_path_factory):
    cfg = config()
    return save(build(cfg), cfg, tmp_path_factory.mktemp("dense") / "ckpt")


def test_missing_checkpoint_and_data(dense_checkpoint, data, tmp_path, capsys):
    err = error_of(["--checkpoint", tmp_path / "nope", "--data", data["lower"]], capsys)
    assert "nope does not exist" in err
    err = error_of(["--checkpoint", dense_checkpoint, "--data", tmp_path / "absent"], capsys)
    assert "absent.bin not found" in err


def test_pn_checkpoint_needs_an_expert(pn_checkpoint, dense_checkpoint, data, capsys):
    _, _, pn_ckpt = pn_checkpoint
    err = error_of(["--checkpoint", pn_ckpt, "--data", data["lower"]], capsys)
    assert "is a PN checkpoint (4 experts): pass --expert I" in err
    err = error_of(["--checkpoint", pn_ckpt, "--data", data["lower"], "--expert", 4], capsys)
    assert "--expert 4 is outside [0, model.num_experts = 4)" in err
    err = error_of(["--checkpoint", dense_checkpoint, "--data", data["lower"], "--expert", 0],
                   capsys)
    assert "applies to PN checkpoints" in err


def test_tokenizer_mismatch_is_refused(dense_checkpoint, data, capsys):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    root = data["root"]
    builder = IndexedDatasetBuilder(str(root / "wide.bin"), dtype=np.uint16)
    builder.add_document(torch.tensor([5, 6, 300, EOD]), [4])  # 300 >= vocab 257
    builder.finalize(str(root / "wide.idx"))
    err = error_of(["--checkpoint", dense_checkpoint, "--data", root / "wide"], capsys)
    assert "tokenizer/vocabulary mismatch" in err and "token id 300" in err
    builder = IndexedDatasetBuilder(str(root / "no_eod.bin"), dtype=np.uint16)
    builder.add_document(torch.tensor([5, 6, 7, 2]), [4])  # ends with 2, the model's EOD is 256
    builder.finalize(str(root / "no_eod.idx"))
    err = error_of(["--checkpoint", dense_checkpoint, "--data", root / "no_eod"], capsys)
    assert "not the model's EOD id 256" in err


def test_argument_errors(dense_checkpoint, pn_checkpoint, data, tmp_path, capsys):
    base = ["--checkpoint", dense_checkpoint, "--data", f"{data['lower']},{data['upper']}"]
    assert "--names: 1 names for 2 --data prefixes" in error_of([*base, "--names", "a"], capsys)
    assert "distinct" in error_of([*base, "--names", "a,a"], capsys)
    existing = tmp_path / "exists.json"
    existing.write_text("{}")
    assert "--overwrite" in error_of([*base, "--output", existing], capsys)
    _, _, pn_ckpt = pn_checkpoint
    err = error_of(["--checkpoint", pn_ckpt, "--data", data["lower"], "--cluster-ids-from",
                    tmp_path], capsys)
    assert "assignments.npy not found" in err
