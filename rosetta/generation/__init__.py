"""The generation engine: one decode loop (prefill, KV cache, sampling, beam search, stopping, streaming,
constraints, continuous batching) for every decoder."""
