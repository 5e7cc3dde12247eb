"""python -m mixllm_jax.serve --checkpoint DIR [--backends backends.yaml] [--port 8000] ..."""

import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # before transformers is imported

from mixllm_jax.serve.app import main  # noqa: E402

main()
