"""data_tools: the data side of megatron-pn (`pn-data`).

tokenize -> index (Megatron .bin/.idx) -> embed (Sentence-BERT windows) -> cluster (faiss k-means)
-> importance (SLM-is resampling) -> stats. Each step is one module with a `register(subparsers)`
function that adds its subcommand to `pn-data`.
"""
