"""pdserve workers: the paged-KV inference engine and the KV-cache transports."""
