"""`python -m otvllm ...`: the same as the `otvllm` command."""

import sys

from otvllm.cli import main

sys.exit(main())
