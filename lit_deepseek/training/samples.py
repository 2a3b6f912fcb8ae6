"""Sample generations at validation time, logged to MLflow as text artifacts (`logging.sample_prompts`)."""

from __future__ import annotations

from typing import Optional

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from torch import nn


class SampleGenerations(L.Callback):
    """After each validation, continue every prompt greedily and log ``samples/step<N>.txt``."""

    def __init__(self, prompts: list[str], max_new_tokens: int = 48, tokenizer: Optional[str] = None) -> None:
        from lit_deepseek.data.tokenizer import load_tokenizer

        self.prompts = list(prompts)
        self.max_new_tokens = max_new_tokens
        self.tokenizer = load_tokenizer(tokenizer)
        self._warned = False

    def _whole_model(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Optional[nn.Module]:
        """The model when this process holds all of it as plain tensors (no TP/PP/EP/FSDP sharding)."""
        from torch.distributed.tensor import DTensor

        from lit_deepseek.model import DeepSeekV3

        model = getattr(pl_module, "model", None)
        whole = (isinstance(model, DeepSeekV3) and model.embed is not None and model.head is not None
                 and len(model.layers) == model.cfg.num_layers
                 and not any(isinstance(p, DTensor) for p in model.parameters())
                 and all(m.experts.num_local_experts == m.num_experts for m in model.moe_layers()))
        if whole:
            return model
        if not self._warned:
            rank_zero_warn("logging.sample_prompts: the model is sharded over processes (TP/PP/EP/FSDP); "
                           "validation samples are skipped")
            self._warned = True
        return None

    @rank_zero_only
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not self.prompts:
            return
        model = self._whole_model(trainer, pl_module)
        if model is None:
            return
        text = self.render(model, trainer.global_step)
        for logger in trainer.loggers:
            experiment, run_id = getattr(logger, "experiment", None), getattr(logger, "run_id", None)
            if run_id is not None and hasattr(experiment, "log_text"):
                experiment.log_text(run_id, text, f"samples/step{trainer.global_step:07d}.txt")

    def render(self, model: nn.Module, step: int) -> str:
        """Greedy continuations of every prompt, as the text written to the artifact."""
        from lit_deepseek.generate import generate, pad_prompts

        tok = self.tokenizer
        device = next(model.parameters()).device
        stats = [(buf, buf.clone()) for moe in model.moe_layers()
                 for buf in (moe.expert_load, moe.routed_tokens, moe.dropped_tokens)]
        was_training = model.training
        model.eval()
        try:
            ids, lengths = pad_prompts(tok.encode_batch(self.prompts), pad_id=tok.pad_id, device=device)
            limit = model.cfg.mla.max_context_length - int(lengths.max())
            out = generate(model, ids, max(1, min(self.max_new_tokens, limit)), eos_id=tok.eos_id,
                           prompt_lengths=lengths, pad_id=tok.pad_id)
        finally:
            model.train(was_training)
            with torch.no_grad():
                for buf, saved in stats:  # generation must not count towards the balancing statistics
                    buf.copy_(saved)
        parts = [f"# step {step}"]
        for i, prompt in enumerate(self.prompts):
            new = out[i, int(lengths[i]):].tolist()
            if tok.eos_id in new:
                new = new[:new.index(tok.eos_id)]
            parts.append(f"## prompt {i}\n{prompt}\n## continuation\n{tok.decode(new)}")
        return "\n\n".join(parts) + "\n"
