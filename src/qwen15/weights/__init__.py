"""Checkpoint files to tensors: safetensors (HF), GGUF (llama.cpp), the HF hub, and packaged models."""
