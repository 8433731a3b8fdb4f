"""A stage service: runs one layer range of a Llama model with session KV caches."""
