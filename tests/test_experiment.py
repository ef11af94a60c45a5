"""pn-experiment and pn-plan: the step graph, the local and SLURM runners, the tables on
constructed numbers (interpolation at equal cost, Table 5 from its runs), the planner's choice —
and a smoke run of the whole comparison on a cut-down corpus."""

from __future__ import annotations

import json
import math
import stat
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from helpers import REPO
from megatron_pn import checkpoint
from megatron_pn.experiment.config import load_experiment
from megatron_pn.experiment.grid import Step, build_grid
from megatron_pn.experiment.runner import LocalRunner, SlurmRunner, StepFailed
from megatron_pn.cli.plan import main as pn_plan
from megatron_pn.experiment.plan import plan
from megatron_pn.experiment.report import MIXTURE_ROW
from pn_base.errors import ConfigError

TINY = REPO / "configs" / "experiments" / "tiny.yaml"
STUDY = REPO / "configs" / "experiments" / "pn_study.yaml"


@pytest.fixture
def one_domain(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = load_experiment(TINY, ["domains=[bible]"])
    return cfg, build_grid(cfg, tmp_path / "out")


# -- the graph ---------------------------------------------------------------------------------

def topological(steps: dict) -> list[str]:
    order, state = [], {}

    def visit(name):
        assert state.get(name) != "visiting", f"cycle through {name}"
        if state.get(name) == "done":
            return
        state[name] = "visiting"
        for dep in steps[name].deps:
            visit(dep)
        state[name] = "done"
        order.append(name)

    for name in steps:
        visit(name)
    return order


def test_grid_is_a_closed_acyclic_graph_with_every_run(one_domain):
    cfg, grid = one_domain
    steps = grid.steps
    for step in steps.values():
        assert set(step.deps) <= set(steps), f"{step.name}: unknown deps"
    assert len(topological(steps)) == len(steps)
    kinds = [s.kind for s in steps.values()]
    k, sizes = cfg.clusters["pn"], len(cfg.spec_sizes)
    n = {name: len(method.budgets) for name, method in cfg.methods.items() if name != "distill"}
    # a run per budget (mix: per budget and expert; SLM-is: per budget, domain (1) and size)
    assert kinds.count("pretrain") == (n["slm"] + n["llm"] + n["pn"] + n["pnmix"] + n["cond"]
                                       + n["mix"] * k + n["is"] * sizes)
    # each run per size (SLM-d: one per SLM budget; the LoRA rows: one more per run of their
    # method), Table 5: histogram + one per expert
    lora = sum(n[m] for m in cfg.lora_rows)
    assert cfg.lora_rows == ["slm", "llm", "pn"]
    assert kinds.count("finetune") == (sum(n.values()) + n["slm"] + lora) * sizes + 1 + k
    # a fine-tuning run starts from a checkpoint one of its dependencies writes
    for step in steps.values():
        if step.kind == "finetune":
            load = next(a for a in step.cmd if a.startswith("checkpoint.load="))
            source = Path(load.split("=", 1)[1])
            made = [steps[d].done.parent for d in step.deps]
            assert source in made or source.parent in made, step.name  # mix: source/expert
    distill = steps["finetune/distill/b3000/bible_s50k"]
    assert "finetune/llm/b2300/bible_s50k" in distill.deps  # the teacher of the same index
    assert any(a.startswith("distill.teacher=") and "spec/llm/b2300/bible_s50k/ft/ckpt" in a
               for a in distill.cmd)
    assert {"distill.weight=0.5", "distill.temperature=1.0"} <= set(distill.cmd)
    # a LoRA row: the projected expert fine-tuned with adapters, evaluated on the test split
    adapted = steps["finetune/pn+lora/b3000/bible_s50k"]
    assert cfg.lora_config in adapted.cmd and cfg.finetune_config in adapted.cmd
    assert adapted.deps == steps["finetune/pn/b3000/bible_s50k"].deps
    assert steps["eval/after/pn+lora/b3000/bible_s50k"].deps == [adapted.name,
                                                                  "data/preprocess/bible_test"]


def test_learning_curve_runs_share_data_and_evaluation_schedule(tmp_path, monkeypatch):
    """curves: one pretraining run per variant and seed on the PN clustering's data, evaluated
    on the generic test set and each domain's valid set (a PN routed by their assignments)."""
    monkeypatch.chdir(REPO)
    cfg = load_experiment(STUDY, ["domains=[bible]", "curves.seeds=[3]"])
    steps = build_grid(cfg, tmp_path / "out").steps
    topological(steps)
    runs = {n: s for n, s in steps.items() if n.startswith("curves/")}
    k = cfg.clusters["pn"]
    assert sorted(runs) == sorted([f"curves/{v}/s3" for v in cfg.curves.variants if v != "mix"]
                                  + [f"curves/mix/s3/expert_{e:04d}" for e in range(k)])
    for name, step in runs.items():
        args = dict(a.split("=", 1) for a in step.cmd if "=" in a)
        share = k if "/mix/" in name else 1  # SLM-mix: the steps shared by k experts
        assert args["train.seed"] == "3" and args["train.steps"] == str(cfg.curves.steps // share)
        assert args["train.eval_interval"] == str(cfg.curves.eval_interval // share)
        assert args["data.blend_file"].endswith("clusters/pn/generic_blend.json")
        sets = args["train.eval_sets"]
        assert "generic_test" in sets and "bible_valid" in sets
        routed = "/pn_" in name or "/mix/" in name  # (mix: its own cluster's windows)
        assert ("assign/pn/bible_valid" in sets) == routed
        assert ("model.num_experts" in args) == routed
        assert ("data.expert" in args) == ("/mix/" in name)
        assert {"data/assign/pn/generic_test", "data/assign/pn/bible_valid"} <= set(step.deps)


def test_learning_curve_tables_average_seeds(tmp_path, monkeypatch):
    from megatron_pn.experiment.curves import MACRO, read_curves, write_curves

    monkeypatch.chdir(REPO)
    cfg = load_experiment(STUDY, ["domains=[bible,fortunes]", "curves.steps=300",
                                  "curves.eval_interval=150", "curves.seeds=[1,2]",
                                  "curves.variants={slm: {config: configs/tiny/slm.yaml}}"])
    for seed, scale in ((1, 1.0), (2, 2.0)):
        run = tmp_path / "curves" / "slm" / f"s{seed}"
        run.mkdir(parents=True)
        records = [{"step": step, "split": f"eval/{name}", "loss": math.log(ppl * scale)}
                   for step in (150, 300)
                   for name, ppl in (("generic", 100), ("bible", 50), ("fortunes", 200))]
        (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    curves = read_curves(tmp_path, cfg)
    assert curves["slm"][MACRO][300] == pytest.approx([math.log(100), math.log(200)])
    text = write_curves(tmp_path, cfg)
    assert "| slm | 150.0 +- 50.0 | 150.0 +- 50.0 |" in text  # generic: ppl 100 and 200
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_slm_mix_curve_pools_its_experts_by_tokens(tmp_path, monkeypatch):
    """An SLM-mix expert at its step s is the mixture at step s x k; the mixture's loss on a set
    is the token-weighted mean of its experts' losses on their own clusters' windows."""
    from megatron_pn.experiment.curves import read_curves

    monkeypatch.chdir(REPO)
    cfg = load_experiment(STUDY, ["domains=[bible]", "curves.steps=400", "clusters.pn=2",
                                  "curves.eval_interval=200", "curves.seeds=[1]",
                                  "curves.variants={mix: {config: configs/tiny/mix.yaml}}"])
    for expert, (loss, tokens) in enumerate(((1.0, 300), (4.0, 100))):
        run = tmp_path / "curves" / "mix" / "s1" / f"expert_{expert:04d}"
        run.mkdir(parents=True)
        records = [{"step": 100, "split": f"eval/{name}", "loss": loss, "tokens": tokens}
                   for name in ("generic", "bible")]
        (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    curves = read_curves(tmp_path, cfg)
    assert curves["mix"]["generic"][200] == pytest.approx([(1.0 * 300 + 4.0 * 100) / 400])
    with pytest.raises(ConfigError, match="divisible"):
        load_experiment(STUDY, ["curves.eval_interval=150", "curves.variants={mix: {config: "
                                "configs/tiny/mix.yaml}}"])


def test_only_the_clusterings_the_methods_use_are_built(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    dense = load_experiment(TINY, ["domains=[bible]",
                                   "methods={slm: {config: configs/tiny/slm.yaml, budgets: [4]}}"])
    assert not any(name.startswith(("data/embed", "data/cluster", "data/assign"))
                   for name in build_grid(dense, tmp_path / "a").steps)
    is_only = load_experiment(TINY, ["domains=[bible]", "methods={slm: {config: "
                                     "configs/tiny/slm.yaml, budgets: [4]}, is: {config: "
                                     "configs/tiny/slm.yaml, budgets: [4]}}"])
    names = set(build_grid(is_only, tmp_path / "b").steps)
    assert "data/cluster/is" in names and "data/cluster/pn" not in names
    assert not any(name.startswith("data/assign/pn") for name in names)


def test_bad_experiment_configs_name_the_field(tmp_path, monkeypatch):
    from pn_base.errors import ConfigError

    monkeypatch.chdir(REPO)
    for override, message in [("domains=[atlantis]", "atlantis/train.jsonl.gz not found"),
                              ("spec_sizes={s1m: 1000000}", "finetune_steps: give a step cap"),
                              ("methods.slm.budgets=[]", "methods.slm.budgets"),
                              ("speling=1", "unknown keys ['speling']")]:
        with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
            load_experiment(TINY, [override])


def test_an_override_replaces_its_key_and_only_it(monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = load_experiment(TINY, ["spec_sizes={a: 10}", "finetune_steps={a: 5}",
                                 "methods.pn.budgets=[7]"])
    assert cfg.spec_sizes == {"a": 10} and cfg.finetune_steps == {"a": 5}
    assert cfg.methods["pn"].budgets == [7] and cfg.methods["pn"].config == "configs/tiny/pn.yaml"
    assert cfg.methods["slm"] == load_experiment(TINY, []).methods["slm"]



def test_overrides_may_follow_the_options(capsys):
    from megatron_pn.cli.experiment import parse_args

    args = parse_args(["run", str(TINY), "a=1", "--out", "x", "--jobs", "1", "b={c: [1, 2]}"])
    assert (args.overrides, args.out, args.jobs) == (["a=1", "b={c: [1, 2]}"], "x", 1)
    for bad in (["run", str(TINY), "--out", "x", "stray"], ["report", "out", "a=1"]):
        with pytest.raises(SystemExit) as exit_:
            parse_args(bad)
        assert exit_.value.code == 2
        assert "unrecognized arguments" in capsys.readouterr().err

# -- the runners -------------------------------------------------------------------------------

def shell_step(name, tmp, deps=(), code=0, kind="data"):
    done = tmp / f"{name}.done"
    script = f"import sys; print('running {name}'); sys.exit({code}) if {code} else " \
             f"open({str(done)!r}, 'w').write('ok')"
    return Step(name, kind, done, [sys.executable, "-c", script], list(deps))


def test_local_runner_runs_in_dependency_order_and_stops_at_a_failure(tmp_path):
    steps = {s.name: s for s in [
        shell_step("a", tmp_path), shell_step("b", tmp_path, ["a"]),
        shell_step("bad", tmp_path, ["a"], code=3), shell_step("after_bad", tmp_path, ["bad"])]}
    grid = SimpleNamespace(steps=steps, out=tmp_path / "out")
    with pytest.raises(StepFailed) as err:
        LocalRunner(grid, slots=2, quiet=True).run()
    assert "step bad failed" in str(err.value) and "running bad" in str(err.value)
    assert steps["a"].done.exists() and not steps["after_bad"].done.exists()
    # a re-run skips what is done; fixed, it finishes
    steps["bad"] = shell_step("bad", tmp_path, ["a"])
    LocalRunner(grid, slots=1, quiet=True).run()
    assert all(s.done.exists() for s in steps.values())


def test_slurm_runner_chains_pending_steps_with_afterok(one_domain, tmp_path):
    cfg, grid = one_domain
    record = tmp_path / "sbatch.log"
    fake = tmp_path / "sbatch"
    fake.write_text(f"#!/bin/bash\necho \"$*\" >> {record}\nwc -l < {record}\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    tokenizer = grid.steps["data/tokenizer"].done  # a finished step is not submitted
    tokenizer.parent.mkdir(parents=True)
    tokenizer.write_text("")
    jobs = SlurmRunner(grid, sbatch=str(fake)).run()
    lines = record.read_text().splitlines()
    assert len(jobs) == len(lines) == len(grid.steps) - 1 and "data/tokenizer" not in jobs
    by_id = dict(zip(map(str, range(1, len(lines) + 1)), lines))
    for name, job in jobs.items():
        step, argv = grid.steps[name], by_id[job]
        pending = {jobs[d] for d in step.deps if d in jobs}
        chained = [a.split(":")[1:] for a in argv.split() if a.startswith("--dependency=")]
        assert set(*chained or [[]]) == pending, name
        if step.kind in ("pretrain", "finetune"):
            assert "slurm/pretrain.sh " in argv and "megatron_pn.cli.train" not in argv
        elif step.kind == "eval":
            assert "--wrap" in argv and "megatron_pn.cli.evaluate --batch" in argv
    preprocess = by_id[jobs["data/preprocess/generic"]]
    assert "--dependency" not in preprocess  # its only dependency (the tokenizer) is done


# -- tables and the planner on constructed numbers -----------------------------------------------

def method_rows(method, costs, nlls, spec_cost, generic_nll=None):
    """Rows of results.json: one budget per cost, the same spec cost and NLL at every size."""
    return [{"method": method, "budget": i, "generic_cost": c,
             "generic_nll": generic_nll or nll, "sizes": {
                 "small": {"nll_before": nll + 1, "nll_after": nll, "spec_cost": spec_cost}}}
            for i, (c, nll) in enumerate(zip(costs, nlls))]


def constructed_results():
    return {"domains": ["a", "b"], "spec_sizes": {"small": 1000}, "methods": {
        # generic pretraining shared by all domains, cheap specialization
        "pn": method_rows("pn", [10, 20, 40], [3.0, 2.8, 2.6], 0.1),
        "slm": method_rows("slm", [5, 10, 20, 40], [3.3, 3.1, 2.9, 2.8], 0.1),
        # nothing shared, expensive per domain
        "is": method_rows("is", [0, 0, 0], [2.5, 2.4, 2.3], 30.0),
        "llm": method_rows("llm", [20, 40, 80], [2.2, 2.0, 1.9], 0.3)},
        "parameters": {"pn": {"inference": 100}, "slm": {"inference": 100},
                       "is": {"inference": 100}, "llm": {"inference": 600}}}


def test_table8_interpolates_every_method_at_the_same_pretraining_cost():
    from megatron_pn.experiment.report import common_cost_range, table8

    results = constructed_results()
    del results["methods"]["is"]
    assert common_cost_range(results) == (20, 40)
    text = table8(results, target=20 * math.sqrt(2))  # half-way between 20 and 40 in log-cost

    def cells(label):
        line = next(line for line in text.splitlines() if line.startswith(f"| {label} |"))
        return [c.strip() for c in line.strip("|").split("|")]

    # generic, no ft (NLL + 1), ft: SLM-pn 2.7 (between 2.8 and 2.6), SLM 2.85, LLM 2.1
    assert cells("SLM-pn")[1:] == [f"{math.exp(v):.1f}" for v in (2.7, 3.7, 2.7)]
    assert cells("SLM")[3] == f"{math.exp(2.85):.1f}" and cells("LLM")[3] == f"{math.exp(2.1):.1f}"


def test_plan_prefers_shared_pretraining_for_many_domains_and_respects_inference_budget():
    results = constructed_results()
    few = plan(results, domains=1, size="small", inference_budget=100, budget=41.0)
    # one domain: SLM-is (0 + 30.1 at its largest budget = 30) is affordable and best (2.3)
    assert few["recommendation"] == "is"
    many = plan(results, domains=100, size="small", inference_budget=100, budget=60.0)
    # 100 domains: SLM-is costs 3000 even at its smallest budget; SLM-pn's 40 + 10 = 50 <= 60
    # reaches 2.6, the SLM at 50 reaches 2.8: SLM-pn
    by_method = {r["method"]: r for r in many["rows"]}
    assert by_method["is"]["nll"] is None and many["recommendation"] == "pn"
    assert by_method["pn"]["nll"] == pytest.approx(2.6) and by_method["slm"]["nll"] == 2.8
    assert [e["method"] for e in many["excluded"]] == ["llm"]  # 600 > 100 parameters
    unlimited = plan(results, domains=100, size="small", inference_budget=None, budget=120.0)
    assert unlimited["recommendation"] == "llm"  # 80 + 30 = 110 <= 120: NLL 1.9


def test_plan_offers_a_projected_model_without_fine_tuning_at_the_projection_cost():
    """An instant specialist (a mixture-trained PN's histogram model): C_spec is the projection
    alone, its NLL the one before fine-tuning; for many domains that can win."""
    results = constructed_results()
    rows = method_rows("pnmix", [10, 20, 40], [2.9, 2.7, 2.5], 0.1)
    for row in rows:  # before fine-tuning 0.05 worse than after, for a hundredth of the cost
        row["sizes"]["small"].update(nll_before=row["sizes"]["small"]["nll_after"] + 0.05,
                                     projection_cost=0.001)
    results["methods"]["pnmix"] = rows
    results["parameters"]["pnmix"] = {"inference": 100}
    many = plan(results, domains=1000, size="small", inference_budget=100, budget=45.0)
    by_method = {r["method"]: r for r in many["rows"]}
    # 1000 domains: fine-tuning costs 100 on top of any pretraining (nothing affordable at 45);
    # without it the mixture-trained PN's 40 + 1 = 41 reaches 2.55
    assert by_method["pnmix"]["nll"] is None
    assert by_method["pnmix (no fine-tuning)"]["nll"] == pytest.approx(2.55)
    assert many["recommendation"] == "pnmix (no fine-tuning)"
    assert "pn (no fine-tuning)" not in by_method  # no projection cost recorded: not an option


def test_plan_command_prints_the_numbers_and_explains_bad_input(tmp_path, capsys):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(constructed_results()))
    assert pn_plan(["--results", str(path), "--domains", "100", "--spec-size", "800",
                    "--inference-budget", "0.1k", "--budget", "60"]) == 0
    out = capsys.readouterr().out
    assert "recommendation: SLM-pn" in out and "over the inference budget" in out
    assert "| SLM-pn | 100 | 20, 30, 50 |" in out  # C_total(100) at its three budgets
    assert pn_plan(["--results", str(tmp_path / "none.json"), "--domains", "1",
                    "--spec-size", "small"]) == 2
    assert "not found" in capsys.readouterr().err
    assert pn_plan(["--results", str(path), "--domains", "1", "--spec-size", "small",
                    "--inference-budget", "lots"]) == 2
    assert "cannot read 'lots'" in capsys.readouterr().err


# -- the whole comparison, cut down ---------------------------------------------------------------

# The project's one end-to-end run: every command chained as `make demo` and the experiments
# chain them (tokenizer, datasets, embeddings and clusters, every method's pretraining - the PN
# on 2 processes as in configs/experiments/demo.yaml -, projection, fine-tuning, evaluation on
# the test split, Table 5's strategies, the HF export, tables and figures).
SMOKE = ["domains=[fortunes]", "generic_chars=300000", "vocab_size=512",
         "spec_sizes={s20k: 20000}", "test_max_tokens=2000", "clusters={pn: 2, is: 3}",
         "finetune_steps={s20k: 6}", "finetune_overrides=[train.eval_interval=3,"
         "train.valid_tokens=1024,train.log_interval=1000]",
         "methods.slm.budgets=[8]", "methods.llm.budgets=[4]", "methods.pn.budgets=[8]",
         "methods.pn.procs=2", "methods.pnmix.budgets=[8]",
         "methods.pnmix.overrides=[model.code_map=learned,data.mixture=micro_batch]",
         "methods.cond.budgets=[8]",
         "methods.mix.budgets=[4]",
         "methods.is.budgets=[8]", "lora_methods=[pn]",
         "export_hf={pn: [fortunes]}"]


def test_demo_config_builds_the_demo_pipeline(tmp_path, monkeypatch):
    """configs/experiments/demo.yaml (`make demo`), whose steps the smoke run below runs at a
    smaller size: every step of the SLM-pn pipeline, the PN on 2 processes, the HF export of
    the fine-tuned expert, evaluations on the domains' test splits."""
    monkeypatch.chdir(REPO)
    steps = build_grid(load_experiment(REPO / "configs" / "experiments" / "demo.yaml", []),
                       tmp_path / "out").steps
    assert len(topological(steps)) == len(steps)
    assert "--nproc-per-node" in steps["pretrain/pn/b300"].cmd
    export = steps["export/pn/bible"]
    assert "finetune/pn/b300/bible_s200k" in export.deps
    assert str(tmp_path / "out" / "hf" / "pn" / "bible") in export.cmd
    assert {f"eval/{when}/{method}/b300/{domain}_s200k"
            for when in ("before", "after") for method in ("slm", "pn")
            for domain in ("bible", "python_docs", "postgres_docs", "manpages", "fortunes")
            } <= set(steps)


@pytest.mark.slow
def test_experiment_smoke_run_reports_every_method(tmp_path, monkeypatch, capsys):
    from megatron_pn.cli.experiment import main

    monkeypatch.chdir(REPO)
    out = tmp_path / "exp"
    assert main(["run", str(TINY), *SMOKE, "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out  # the tables, also with --quiet
    assert "Per domain, spec size s20k" in printed and "| fortunes |" in printed
    assert "**macro-average**" in printed
    results = json.loads((out / "results.json").read_text())
    uniform = math.log(512)  # the NLL of a uniform guess over the vocabulary
    for method, rows in results["methods"].items():
        for row in rows:
            cell = row["sizes"]["s20k"]
            assert cell["nll_after"] is not None and cell["spec_cost"] > 0, (method, row)
            assert cell["nll_after"] < uniform, (method, row)  # every model learned something
            if method != "distill":
                assert cell["nll_before"] is not None, (method, row)
            if method in ("slm", "llm", "pn", "pnmix", "cond", "mix"):
                assert row["generic_nll"] is not None and row["generic_cost"] > 0
    # evaluated on the domain's test split, not on the validation split early stopping used
    evaluation = json.loads((out / "spec" / "pn" / "b8" / "fortunes_s20k" / "eval_after.json")
                            .read_text())
    assert evaluation["datasets"][0]["name"] == "fortunes_test"
    # the fine-tuned PN expert exported to Hugging Face
    assert json.loads((out / "hf" / "pn" / "fortunes" / "config.json").read_text())[
        "vocab_size"] >= 512
    assert results["parameters"]["mix"]["pretrain"] == 2 * results["parameters"]["slm"]["pretrain"]
    assert results["parameters"]["pn"]["inference"] == results["parameters"]["slm"]["inference"]
    # SLM-cond: the SLM plus k vectors in pretraining, the SLM once folded
    assert results["parameters"]["cond"]["inference"] == results["parameters"]["slm"]["inference"]
    projection = json.loads((out / "spec" / "cond" / "b8" / "fortunes_s20k" / "source" /
                             "projection.json").read_text())
    assert projection["strategy"] == "most-frequent" and projection["expert"] in (0, 1)
    # the mixture-trained PN: each domain's model from its histogram, in Table 5 too
    projection = json.loads((out / "spec" / "pnmix" / "b8" / "fortunes_s20k" / "source" /
                             "projection.json").read_text())
    assert projection["strategy"] == "histogram" and projection["expert"] is None
    assert results["strategies"]["domains"]["fortunes"][MIXTURE_ROW]["nll_before"] is not None
    # the runs of --jobs 2 overlap: the report says their costs come from a shared machine
    assert results["shared_machine"]["runs"] and "shared the machine" in printed
    strategies = results["strategies"]["domains"]["fortunes"]
    assert all(strategies[s]["nll_after"] is not None
               for s in ("most-frequent", "best-loss", "histogram", "fine-tune all, keep best"))
    # the projected expert fine-tuned with LoRA: an adapter checkpoint on the projection,
    # costed with it, evaluated from the same starting model
    lora_cell = results["methods"]["pn+lora"][0]["sizes"]["s20k"]
    pn_cell = results["methods"]["pn"][0]["sizes"]["s20k"]
    assert lora_cell["nll_before"] == pn_cell["nll_before"] and lora_cell["nll_after"] is not None
    assert lora_cell["spec_cost"] > results["methods"]["pn"][0]["sizes"]["s20k"]["domains"][
        "fortunes"]["projection_cost"]
    adapters = out / "spec" / "pn+lora" / "b8" / "fortunes_s20k" / "ft" / "ckpt"
    assert checkpoint.saved_config(adapters).finetune.lora.rank == 8
    assert results["parameters"]["pn+lora"] == results["parameters"]["pn"]  # merged: the expert
    tables = (out / "tables.md").read_text()
    assert "| SLM-pn + LoRA |" in tables
    assert "Table 8" in tables and "Table 5" in tables and "| SLM-pn |" in tables
    assert "| SLM-cond |" in tables and "| SLM-pn-mixture |" in tables
    for png in ("fig4_spec_ppl_vs_cost.png", "fig6_total_cost.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    # a re-run has nothing left to do
    capsys.readouterr()
    assert main(["list", str(TINY), *SMOKE, "--out", str(out)]) == 0
    steps = len(build_grid(load_experiment(TINY, SMOKE), out).steps)
    assert f"{steps} of {steps} steps done" in capsys.readouterr().out
    assert pn_plan(["--results", str(out / "results.json"), "--domains", "10",
                    "--spec-size", "s20k"]) == 0


def test_paper_scale_experiment_submits_multi_node_training_jobs(tmp_path, monkeypatch):
    """configs/experiments/paper.yaml on a stand-in corpus: every step becomes a SLURM job with
    the resources of its kind; training goes through slurm/pretrain.sh."""
    import gzip

    monkeypatch.chdir(REPO)
    corpus = tmp_path / "corpus"
    domains = ["generic", "arxiv", "europarl", "freelaw", "gutenberg", "opensubtitles",
               "openwebtext2", "pubmed_abstracts", "stackexchange", "wikipedia"]
    for d in domains:
        (corpus / d).mkdir(parents=True)
        for split in ("train", "valid", "test"):
            with gzip.open(corpus / d / f"{split}.jsonl.gz", "wt") as f:
                f.write(json.dumps({"text": f"{d} {split}"}) + "\n")
    cfg = load_experiment(REPO / "configs" / "experiments" / "paper.yaml", [f"corpus={corpus}"])
    grid = build_grid(cfg, tmp_path / "out")
    assert sum(s.kind == "pretrain" for s in grid.steps.values()) == (
        3 * 3 + 3 * 16 + 3 * 9 * 3)  # slm/llm/pn, 16 mix experts, SLM-is per domain and size
    record, fake = tmp_path / "sbatch.log", tmp_path / "sbatch"
    fake.write_text(f"#!/bin/bash\necho \"$*\" >> {record}\nwc -l < {record}\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    jobs = SlurmRunner(grid, sbatch=str(fake)).run()
    lines = dict(zip(map(str, range(1, len(jobs) + 1)), record.read_text().splitlines()))
    pn = lines[jobs["pretrain/pn/b420000"]]
    assert "--nodes=4 --gpus-per-node=8" in pn and "slurm/pretrain.sh configs/paper/pn16.yaml" in pn
    assert "train.steps=420000" in pn and "data.blend_file=" in pn
    finetune = lines[jobs["finetune/pn/b420000/arxiv_1m"]]
    assert "--gpus-per-node=1" in finetune and "configs/finetune/paper_1m.yaml" in finetune
    assert "train.steps=2000" in finetune
