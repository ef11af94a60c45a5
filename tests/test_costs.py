"""Bookkeeping on constructed numbers: macro-average, C_total, interpolation at
equal cost, reading cost logs."""

from __future__ import annotations

import json
import math

import pytest

from megatron_pn.costs import (device_hours, interpolate_at_cost,
                               macro_average, total_cost)


def test_macro_average_is_exp_of_mean_nll():
    assert math.exp(macro_average([math.log(10), math.log(40)])) == pytest.approx(20.0)
    assert macro_average([1.0, None]) is None and macro_average([]) is None
    # (not the mean of perplexities, 25, nor a token-weighted average)


def test_total_cost():
    assert list(total_cost(100.0, 2.0, [0, 1, 10])) == [100.0, 102.0, 120.0]


def test_interpolation_at_equal_cost_is_linear_in_log_cost():
    costs, ppl = [100, 400], [20.0, 16.0]
    assert interpolate_at_cost(costs, ppl, 200) == pytest.approx(18.0)  # log2 midpoint
    assert interpolate_at_cost([400, 100], [16.0, 20.0], 100) == 20.0  # order does not matter
    with pytest.raises(ValueError, match="outside the measured range"):
        interpolate_at_cost(costs, ppl, 800)


def test_device_hours_from_cost_log(tmp_path):
    (tmp_path / "cost.json").write_text(json.dumps({"runs": [
        {"phase": "pretrain", "device_hours": 2.0}, {"phase": "finetune", "device_hours": 0.5},
        {"phase": "pretrain", "device_hours": 1.0}]}))
    assert device_hours(tmp_path) == 3.5
    assert device_hours(tmp_path, "pretrain") == 3.0
    with pytest.raises(FileNotFoundError, match="no cost log"):
        device_hours(tmp_path / "missing")


def test_cpu_runs_cost_their_cpu_time_not_their_wall_time(tmp_path):
    """On a shared CPU machine a run's cost is its processes' CPU time (a run that waited on
    another job took longer, not more compute); GPU runs cost wall time x devices."""
    (tmp_path / "cost.json").write_text(json.dumps({"runs": [
        {"phase": "pretrain", "device": "CPU (2 cores)", "device_hours": 2.0,
         "cpu_seconds": 1800.0},
        {"phase": "pretrain", "device": "NVIDIA H200", "device_hours": 1.0, "cpu_seconds": 90.0},
        {"phase": "pretrain", "device": "CPU (2 cores)", "device_hours": 0.25}]}))  # older log
    assert device_hours(tmp_path) == 0.5 + 1.0 + 0.25


def entry(start, end, load=1.0, cpu_seconds=10.0):
    return {"phase": "pretrain", "device": "CPU (2 cores)", "devices": 1, "cpu_seconds": cpu_seconds,
            "wall_seconds": end - start, "device_hours": (end - start) / 3600, "steps": 1,
            "tokens": 1, "started": start, "ended": end, "load_average": load, "cpus": 2}


def test_a_run_shared_the_machine_when_another_overlaps_it_or_the_load_was_high():
    from megatron_pn.costs import shared_machine

    a, b, c = entry(0, 10), entry(5, 15), entry(20, 30)
    runs = [a, b, c]
    assert shared_machine(a, runs) and shared_machine(b, runs)  # they overlap
    assert not shared_machine(c, runs)  # alone: after both
    after_a = entry(10, 20)
    assert not shared_machine(after_a, [a, after_a])  # touching is not sharing
    assert shared_machine(entry(40, 50, load=3.5), runs)  # outside work: load above cores + 1
    legacy = {k: v for k, v in c.items() if k not in ("started", "ended", "load_average", "cpus")}
    assert not shared_machine(legacy, runs)  # logged before the fields existed


def test_report_flags_or_leaves_out_the_costs_of_shared_runs(tmp_path):
    from megatron_pn.experiment.report import Collector, cost_logs, shared_runs, shared_note

    out = tmp_path / "exp"
    logs = {"pretrain/slm/b10": [entry(0, 10, cpu_seconds=36.0)],
            "pretrain/pn/b10": [entry(5, 15, cpu_seconds=72.0)],
            "spec/slm/b10/d_s/ft": [entry(20, 30, cpu_seconds=3.6)]}
    for run, runs in logs.items():
        (out / run).mkdir(parents=True)
        (out / run / "cost.json").write_text(json.dumps({"runs": runs}))
    shared = shared_runs(cost_logs(out))
    assert shared == {out / "pretrain/slm/b10", out / "pretrain/pn/b10"}

    for alone_only, expected in ((False, 0.01), (True, None)):
        collector = Collector.__new__(Collector)  # only what device_hours reads
        collector.out, collector.shared, collector.alone_only = out, shared, alone_only
        assert collector.device_hours(out / "pretrain/slm/b10") == (
            None if expected is None else pytest.approx(expected))
        assert collector.device_hours(out / "spec/slm/b10/d_s/ft") == pytest.approx(0.001)
    note = shared_note({"runs": ["pretrain/pn/b10", "pretrain/slm/b10"], "costs_left_out": False})
    assert "2 runs shared the machine" in note and "--alone-only" in note
    assert "every run had the machine" in shared_note({"runs": [], "costs_left_out": True})
