"""pdserve's inference engine: Llama-family model, paged KV cache, continuous batching.

Entry points: ``engine.LLMEngine`` with ``config.EngineConfig``; ``tiny.ensure_tiny_model``
for a random-weight test model; ``kv_layout.KVLayout`` for KV transports. Submodules are
imported explicitly so that light users (``sampling_params``) do not pay for torch.
"""
