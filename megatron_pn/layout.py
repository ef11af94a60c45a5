"""Names in output directories that one command writes and others read."""

FINISHED = "finished.json"  # in a run dir: the run is over (pipelines wait on it)


def expert_dir(expert: int) -> str:
    """SLM-mix: the run and checkpoint sub-directory of one expert's dense SLM."""
    return f"expert_{expert:04d}"
