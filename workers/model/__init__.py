"""The model: CausalLM and its layers, one file per architecture family, the paged KV cache, batches,
the sampler and offline generation."""
