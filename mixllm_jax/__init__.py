"""mixllm-jax: contextual-bandit LLM routing in JAX."""
