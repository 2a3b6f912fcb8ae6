"""Checkpoint formats: Hugging Face import/export (hf.py) and our native safetensors + YAML layout."""
