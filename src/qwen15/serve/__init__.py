"""The OpenAI-compatible server: `qwen15 serve` (app.py) over a continuously batched, paged-KV engine (batch_engine.py)."""
