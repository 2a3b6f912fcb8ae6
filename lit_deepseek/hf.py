"""Hugging Face checkpoints: `load_hf_model`, `save_hf_model` and conversion (see checkpoint/hf.py)."""

from lit_deepseek.checkpoint.hf import (
    CheckpointError,
    convert,
    convert_checkpoint,
    load_hf_model,
    load_native_model,
    model_config_from_hf,
    model_config_to_hf,
    save_hf_model,
    save_native_model,
)

__all__ = ["CheckpointError", "convert", "convert_checkpoint", "load_hf_model", "load_native_model",
           "model_config_from_hf", "model_config_to_hf", "save_hf_model", "save_native_model"]
