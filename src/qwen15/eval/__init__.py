"""`qwen15 eval`: benchmarks with Qwen's protocols, data from PyPI, in-process or endpoint backends."""
