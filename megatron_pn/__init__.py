"""megatron-pn: small specialized language models planned early (Grangier et al.).

The training library sits at the top of this package (config, model, data, trainer, engines,
checkpoint, compat; the methods: pn/ for SLM-pn, mix.py for SLM-mix, distill.py for SLM-d,
data_tools/importance.py for SLM-is), the paper's comparison in experiment/, the commands in
cli/. README.md ("Architecture") maps every module.
"""

import warnings

__version__ = "0.1.0"

# Transformer Engine and apex are optional GPU accelerators; megatron-core's torch fallbacks are
# what runs without them (CPU), so their absence is expected, not news.
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex) (and Apex )?(are|is) not installed")
