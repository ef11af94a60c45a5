"""Names in output directories that one command writes and others read.

Library code builds these paths with the constants here, never with a literal, so that a writer
and its readers cannot drift apart. The names are part of the output format: changing one
breaks every existing run directory.
"""

# in a pn-train run directory (logging.run_dir)
FINISHED = "finished.json"  # the run is over (pipelines wait on it)
COST = "cost.json"  # the cost log: wall time x devices of each invocation
METRICS = "metrics.jsonl"  # one JSON record per logged step and evaluation

# in a `pn-data cluster` or `pn-data assign` output directory
HISTOGRAM = "histogram.json"  # per-cluster "windows" and "tokens"


def expert_dir(expert: int) -> str:
    """SLM-mix: the run and checkpoint sub-directory of one expert's dense SLM."""
    return f"expert_{expert:04d}"
