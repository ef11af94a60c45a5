"""pn_base: the bottom layer that data_tools and megatron_pn both build on.

It imports neither of them, nor torch or megatron (tests/test_import_graph.py checks it):
  errors              one error style for every command (UserError, ConfigError,
                      run_command, ArgumentParser)
  fileio              atomic file output (atomic_path, atomic_write_*) and file digests
  outputs             the names of the files one command writes and others read
  tokenizer_identity  which SentencePiece model tokenized a dataset or trained a model,
                      and the one comparison of two such records
"""
