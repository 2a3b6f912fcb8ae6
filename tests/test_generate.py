"""Generation: paged-cache decoding equals full-sequence logits, greedy equals transformers, sampling, FP8 cache."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model_config

from lit_deepseek.generate import _last_logits, generate, pad_prompts, sample_next
from lit_deepseek.model import DeepSeekV3
from lit_deepseek.model.paged_cache import PagedLatentCache


def _model(seed: int = 0, **overrides: object) -> DeepSeekV3:
    cfg = tiny_model_config(**overrides)
    torch.manual_seed(seed)
    model = DeepSeekV3(cfg).eval()
    for moe in model.moe_layers():
        moe.expert_bias.uniform_(-0.1, 0.1)
    return model


def _decode_logits(model: DeepSeekV3, seqs: list[torch.Tensor], prompt_lens: list[int], block_size: int,
                   fp8: bool = False) -> list[torch.Tensor]:
    """Per step: logits [B, V] of the paged path; prefill of ragged prompts, then one token per step."""
    ids, lengths = pad_prompts([s[:n].tolist() for s, n in zip(seqs, prompt_lens)], pad_id=0)
    steps = min(len(s) - n for s, n in zip(seqs, prompt_lens))
    cache = PagedLatentCache(model.cfg.mla, len(model.layers), [len(s) for s in seqs], block_size=block_size,
                             fp8=fp8)
    cache.new_counts = lengths
    out = [_last_logits(model, ids, cache, lengths - 1)]
    cache.advance(lengths)
    for j in range(steps):
        token = torch.stack([s[n + j] for s, n in zip(seqs, prompt_lens)])
        out.append(_last_logits(model, token[:, None], cache, None))
        cache.advance(1)
    return out


@pytest.mark.parametrize("block_size", [4, 64])
def test_paged_decode_equals_full_sequence_logits(block_size: int) -> None:
    model = _model()
    gen = torch.Generator().manual_seed(1)
    prompt_lens = [9, 3, 14]
    seqs = [torch.randint(0, model.cfg.vocab_size, (n + 6,), generator=gen) for n in prompt_lens]
    with torch.no_grad():
        steps = _decode_logits(model, seqs, prompt_lens, block_size)
        for b, (seq, n) in enumerate(zip(seqs, prompt_lens)):
            full = model(seq[None])[0]
            for j, logits in enumerate(steps):
                ref = full[n - 1 + j]
                assert (logits[b] - ref).abs().max() / ref.abs().max() < 1e-5, (b, j)


def test_paged_cache_allocates_per_sequence_blocks() -> None:
    model = _model()
    cache = PagedLatentCache(model.cfg.mla, 3, [5, 64, 17], block_size=8)
    assert cache.num_blocks == 1 + 8 + 3  # no padding to the longest sequence
    assert cache.block_table.shape == (3, 8)
    fp8 = PagedLatentCache(model.cfg.mla, 3, [5, 64, 17], block_size=8, fp8=True, dtype=torch.bfloat16)
    bf16 = PagedLatentCache(model.cfg.mla, 3, [5, 64, 17], block_size=8, dtype=torch.bfloat16)
    width = model.cfg.mla.d_latent + model.cfg.mla.qk_rope_head_dim
    assert fp8.memory_bytes() / bf16.memory_bytes() == pytest.approx((width + 8) / (2 * width))


def test_generate_is_independent_of_batch_neighbours_and_stops_at_eos() -> None:
    model = _model()
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 97, (n,), generator=gen).tolist() for n in (5, 11, 2)]
    ids, lengths = pad_prompts(prompts, pad_id=0)
    batched = generate(model, ids, 8, prompt_lengths=lengths)
    assert batched.dtype == torch.long and batched.shape == (3, 11 + 8)
    for i, p in enumerate(prompts):
        alone = generate(model, torch.tensor([p]), 8)
        assert alone.shape == (1, len(p) + 8)
        assert batched[i, : len(p) + 8].tolist() == alone[0].tolist()
    # stop at EOS: choose the token that row 0 emits third as "EOS"
    eos = int(batched[0, 5 + 2])
    stopped = generate(model, ids, 8, prompt_lengths=lengths, eos_id=eos, pad_id=-1)
    row = stopped[0, 5:].tolist()
    first = row.index(eos)
    assert first <= 2 and all(t == -1 for t in row[first + 1:])


def test_sampling_is_seeded_and_respects_top_k_top_p() -> None:
    model = _model()
    ids = torch.randint(0, 97, (4, 6), generator=torch.Generator().manual_seed(3))
    a = generate(model, ids, 6, temperature=1.0, top_k=5, seed=7)
    b = generate(model, ids, 6, temperature=1.0, top_k=5, seed=7)
    c = generate(model, ids, 6, temperature=1.0, top_k=5, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    logits = torch.tensor([[5.0, 4.0, 0.0, -1.0, -2.0]]).expand(2000, -1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, 1.0, top_k=2, generator=g).tolist()) == {0, 1}
    # p(0) = 0.72, p(1) = 0.27: top_p 0.5 keeps token 0 only, 0.9 keeps both
    assert set(sample_next(logits, 1.0, top_p=0.5, generator=g).tolist()) == {0}
    assert set(sample_next(logits, 1.0, top_p=0.9, generator=g).tolist()) == {0, 1}


def test_bad_arguments_are_one_clear_line() -> None:
    model = _model()
    ids = torch.zeros(1, 4, dtype=torch.long)
    for kwargs, needle in (({"temperature": -1.0}, "temperature"), ({"top_p": 1.5}, "top_p"),
                           ({"top_k": 0}, "top_k"), ({"max_new_tokens": 100}, "max_context_length")):
        args = {"max_new_tokens": 4, **kwargs}
        with pytest.raises(ValueError, match=needle):
            generate(model, ids, **args)


def test_greedy_matches_transformers_generate(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    from lit_deepseek.hf import save_hf_model

    model = _model(mtp_depth=0)
    save_hf_model(model, tmp_path)
    reference = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32).eval()
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(4))
    ours = generate(model, ids, 10)
    with torch.no_grad():
        theirs = reference.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=10,
                                    min_new_tokens=10, pad_token_id=0, eos_token_id=None)
    assert torch.equal(ours, theirs)


def test_fp8_cache_logits_close_to_full_precision_cache() -> None:
    model = _model()
    gen = torch.Generator().manual_seed(5)
    prompt_lens = [10, 6]
    seqs = [torch.randint(0, 97, (n + 5,), generator=gen) for n in prompt_lens]
    with torch.no_grad():
        exact = _decode_logits(model, seqs, prompt_lens, block_size=8)
        fp8 = _decode_logits(model, seqs, prompt_lens, block_size=8, fp8=True)
    errors = [((f - e).abs().max() / e.abs().max()).item() for f, e in zip(exact[1:], fp8[1:])]
    assert max(errors) < 0.05  # e4m3 keeps 3 mantissa bits: a few percent at most on the logits
    assert max(errors) > 0  # the FP8 path really quantized
    assert torch.equal(exact[0], fp8[0])  # the prefill runs the training form on unquantized latents
