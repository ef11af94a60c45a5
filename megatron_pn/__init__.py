"""megatron-pn: small specialized language models planned early (Grangier et al.).

Layout:
  compat      the one place that lets megatron-core's CUDA-only code run on CPU (gloo)
  config      YAML configs as dataclasses, dotted command-line overrides
  model       megatron-core GPTModel built from a layer spec (dense now; PN specs plug in here)
  data        megatron-core indexed/GPT/blended datasets -> micro-batch iterators
  checkpoint  dist_checkpointing save/resume with an atomic `latest` pointer
  trainer     the training loop (TP x PP x DP, distributed optimizer, schedules, logging)
  train       the `pn-train` command
"""

import warnings

__version__ = "0.1.0"

# Transformer Engine and apex are optional GPU accelerators; megatron-core's torch fallbacks are
# what runs without them (CPU), so their absence is expected, not news.
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex) (and Apex )?(are|is) not installed")
