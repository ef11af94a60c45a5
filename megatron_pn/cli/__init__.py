"""The commands of megatron-pn, one module each: arguments in, the library's work, one line or a
table out, errors through pn_base.errors.run_command (one line, exit 2). They import the
heavy parts of the library (megatron-core) only once the arguments are read, so `--help` is fast.

  train       pn-train          experiment  pn-experiment    launch     torchrun for one node
  project     pn-project        plan        pn-plan          preflight  a job's checks
  evaluate    pn-eval           hf          pn-export-hf, pn-import-hf

Multi-process runs start a module with torchrun: `torchrun ... -m megatron_pn.cli.train ...`.
"""
