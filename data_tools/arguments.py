"""Command-line argument types and defaults shared by the `pn-data` subcommands."""

from __future__ import annotations

import argparse
import os


def default_workers() -> int:
    """CPUs this process may use (respects SLURM/taskset CPU binding)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:
        return os.cpu_count() or 1


def positive_int(text: str) -> int:
    """argparse type: an integer > 0."""
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value
