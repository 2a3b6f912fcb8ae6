"""Text generation: prefill with the training form, decode with the absorbed form over a paged cache.

API::

    from lit_deepseek.generate import generate
    out = generate(model, input_ids, max_new_tokens=32)                 # greedy
    out = generate(model, ids, 32, temperature=0.8, top_p=0.95, seed=0, eos_id=tok.eos_id,
                   prompt_lengths=lengths)                              # sampled, prompts of different lengths

Prompts of different lengths are passed right-padded with their lengths (`prompt_lengths`); each
sequence keeps its own length in the cache (`PagedLatentCache`: a block table, no padding in the
cache) and its own rotary positions, so the result for a sequence does not depend on the others
in the batch. The returned tensor [B, S + new] holds, per row, the prompt, then its new tokens,
then `pad_id` (after a sequence stops at EOS, or after a short prompt); with prompts of one
length it is exactly ``[prompt | new]``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lit_deepseek.model.paged_cache import PagedLatentCache


def sample_next(logits: Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None) -> Tensor:
    """Next token per row from logits [B, V]: argmax when temperature is 0, else a draw from the
    temperature-scaled distribution restricted to the top-k tokens and the top-p nucleus."""
    if temperature <= 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) >= top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    """ValueError (one line, naming the argument) for settings that cannot work."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature: must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k: must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p: must be in (0, 1], got {top_p}")


@torch.no_grad()
def generate(model: nn.Module, input_ids: Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
             prompt_lengths: Tensor | list[int] | None = None, pad_id: int | None = None, seed: int | None = None,
             use_fp8_kv: bool | None = None, use_flash_mla: bool | None = None, block_size: int = 64,
             on_tokens: Callable[[Tensor], None] | None = None) -> Tensor:
    """Continue each prompt of input_ids [B, S] by up to max_new_tokens tokens -> LongTensor [B, S + n].

    temperature 0 is greedy; top_k / top_p restrict sampling; `seed` seeds a private generator
    (same seed, same tokens). A sequence stops at `eos_id` (which is kept) and is padded with
    `pad_id` (default: eos_id, else 0); generation ends when every sequence has stopped.
    use_fp8_kv / use_flash_mla default to the model's `model.mla` settings. `on_tokens` receives
    each step's tokens [B] (streaming).
    """
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    cfg = model.cfg
    if input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids: expected [batch, prompt length >= 1], got shape {list(input_ids.shape)}")
    b, s = input_ids.shape
    device = input_ids.device
    lengths = (torch.full((b,), s, dtype=torch.long) if prompt_lengths is None
               else torch.as_tensor(prompt_lengths, dtype=torch.long).cpu())
    if lengths.shape != (b,) or int(lengths.min()) < 1 or int(lengths.max()) > s:
        raise ValueError(f"prompt_lengths: expected {b} lengths between 1 and {s}")
    limit = cfg.mla.max_context_length
    if int(lengths.max()) + max_new_tokens > limit:
        raise ValueError(f"max_new_tokens: prompt ({int(lengths.max())}) + {max_new_tokens} new tokens exceed "
                         f"model.mla.max_context_length ({limit})")
    if pad_id is None:
        pad_id = eos_id if eos_id is not None else 0
    fp8 = cfg.mla.use_fp8_kv if use_fp8_kv is None else use_fp8_kv
    flash = cfg.mla.use_flash_mla if use_flash_mla is None else use_flash_mla
    dtype = next(model.parameters()).dtype
    # the last new token is never fed back, so a sequence caches its prompt + max_new_tokens - 1
    capacities = (lengths + max_new_tokens - 1).tolist()
    cache = PagedLatentCache(cfg.mla, len(model.layers), capacities, block_size=block_size, dtype=dtype,
                             device=device, fp8=fp8, use_flash_mla=flash)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    lengths_dev = lengths.to(device)

    # prefill: the training form over the (right-padded) prompts, latents of real tokens cached
    cache.new_counts = lengths_dev
    logits = _last_logits(model, input_ids, cache, lengths_dev - 1)
    cache.advance(lengths_dev)

    new = torch.full((b, max_new_tokens), pad_id, dtype=torch.long, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    steps = 0
    for step in range(max_new_tokens):
        sampled = sample_next(logits, temperature, top_k, top_p, generator)
        token = torch.where(done, torch.full_like(sampled, pad_id), sampled)
        new[:, step] = token
        steps = step + 1
        if on_tokens is not None:
            on_tokens(token)
        if eos_id is not None:
            done |= token == eos_id
            if bool(done.all()):
                break
        if step + 1 == max_new_tokens:
            break
        logits = _last_logits(model, sampled[:, None], cache, None)  # stopped rows run on, unseen
        cache.advance(1)
    return _assemble(input_ids, lengths_dev, new[:, :steps], pad_id)


def _last_logits(model: nn.Module, ids: Tensor, cache: PagedLatentCache, index: Tensor | None) -> Tensor:
    """Logits [B, V] (float32) at position `index` of each row (the last one when None)."""
    h, _ = model(ids, caches=cache, return_hidden=True)
    h = h[:, -1] if index is None else h[torch.arange(h.shape[0], device=h.device), index]
    return model.head(h).float()


def _assemble(prompts: Tensor, lengths: Tensor, new: Tensor, pad_id: int) -> Tensor:
    """Per row: prompt[:length], new tokens, then pad_id, in a [B, S + steps] tensor."""
    b, s = prompts.shape
    steps = new.shape[1]
    out = torch.full((b, s + steps), pad_id, dtype=torch.long, device=prompts.device)
    cols = torch.arange(s + steps, device=prompts.device)[None]
    out[:, :s] = torch.where(cols[:, :s] < lengths[:, None], prompts, torch.full_like(prompts, pad_id))
    target = (lengths[:, None] + torch.arange(steps, device=prompts.device)[None])  # [B, steps]
    out.scatter_(1, target, new)
    return out


def pad_prompts(prompts: list[list[int]], pad_id: int, device: Any = None) -> tuple[Tensor, Tensor]:
    """Token lists -> (right-padded ids [B, S], lengths [B])."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts: every prompt needs at least one token")
    s = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), s), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p, dtype=torch.long)
    return ids.to(device), torch.tensor([len(p) for p in prompts], dtype=torch.long, device=device)
