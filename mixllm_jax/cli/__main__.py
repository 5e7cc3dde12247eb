"""python -m mixllm_jax.cli ...: the `mixllm-jax` command."""

import sys

from mixllm_jax.cli import main

sys.exit(main())
