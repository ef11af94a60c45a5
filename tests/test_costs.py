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
