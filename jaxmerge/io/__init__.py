"""Checkpoint I/O: safetensors (``safetensors_io``); Hugging Face CLIP loading lives in ``hf``."""
