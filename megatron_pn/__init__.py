"""megatron-pn: small specialized language models planned early (Grangier et al.).

The training library sits at the top of this package (config, model, data, trainer, engines,
checkpoint, compat; the methods: pn/ for SLM-pn, mix.py for SLM-mix, distill.py for SLM-d,
data_tools/importance.py for SLM-is), the paper's comparison in experiment/, the commands in
cli/. README.md ("Architecture") maps every module.
"""

import warnings

from megatron_pn import deferred_compile

__version__ = "0.1.0"

# Transformer Engine and apex are optional GPU accelerators; megatron-core's torch fallbacks are
# what runs without them (CPU), so their absence is expected, not news.
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex) (and Apex )?(are|is) not installed")

# megatron-core's import no longer imports the compiler (2.5 s per process): deferred_compile.py
deferred_compile.install()
