"""lit-deepseek: DeepSeek-V3-style training (MLA + DeepSeekMoE + MTP) with PyTorch Lightning."""

__version__ = "0.1.0"
