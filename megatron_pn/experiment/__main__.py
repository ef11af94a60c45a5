import sys

from megatron_pn.experiment.cli import main

sys.exit(main())
