"""`pn-experiment`: the paper's method comparison as a graph of the project's own commands
(config.py: what to run; grid.py: the steps; runner.py: local or SLURM; report.py: tables,
plots and results.json for `pn-plan`)."""
