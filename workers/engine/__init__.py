"""pdserve's inference engine: Llama-family model, paged KV cache, continuous batching."""
