"""The paper's method comparison as a graph of the project's own commands (config.py: what to
run; grid.py: the steps; runner.py: local or SLURM; worker.py: long-lived step processes;
report.py: tables, plots and results.json; curves.py: learning curves; plan.py: the method for
N domains, read by `pn-plan`). The command is megatron_pn/cli/experiment.py."""
