"""Generation: the decode loop (engine), the KV cache and token sampling."""
