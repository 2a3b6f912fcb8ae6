"""Generation: paged-cache decoding equals full-sequence logits, greedy equals transformers, sampling, FP8 cache."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import warnings
from pathlib import Path

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
    ids, lengths = pad_prompts([s[:n].tolist() for s, n in zip(seqs, prompt_lens, strict=True)], pad_id=0)
    steps = min(len(s) - n for s, n in zip(seqs, prompt_lens, strict=True))
    cache = PagedLatentCache(model.cfg.mla, len(model.layers), [len(s) for s in seqs], block_size=block_size,
                             fp8=fp8)
    cache.new_counts = lengths
    out = [_last_logits(model, ids, cache, lengths - 1)]
    cache.advance(lengths)
    for j in range(steps):
        token = torch.stack([s[n + j] for s, n in zip(seqs, prompt_lens, strict=True)])
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
        for b, (seq, n) in enumerate(zip(seqs, prompt_lens, strict=True)):
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
    from lit_deepseek.checkpoint.hf import save_hf_model

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
    errors = [((f - e).abs().max() / e.abs().max()).item() for f, e in zip(exact[1:], fp8[1:], strict=True)]
    assert max(errors) < 0.05  # e4m3 keeps 3 mantissa bits: a few percent at most on the logits
    assert max(errors) > 0  # the FP8 path really quantized
    assert torch.equal(exact[0], fp8[0])  # the prefill runs the training form on unquantized latents


# ------------------------------------------------------------------------------------ decode kernels
def _filled_cache(fp8: bool, block_size: int = 16, heads: int = 4, lengths: tuple[int, ...] = (37, 5, 70)):
    from lit_deepseek.config import MLAConfig

    mla = MLAConfig(d_model=64, d_latent=32, d_q_latent=0, num_heads=heads, qk_nope_head_dim=8,
                    qk_rope_head_dim=16, v_head_dim=8, max_context_length=128)
    gen = torch.Generator().manual_seed(6)
    cache = PagedLatentCache(mla, 1, [n + 2 for n in lengths], block_size=block_size, fp8=fp8)
    s = max(lengths)
    cache.new_counts = torch.tensor(lengths)
    cache[0].write(torch.randn(len(lengths), s, 32, generator=gen), torch.randn(len(lengths), s, 16, generator=gen))
    cache.advance(torch.tensor(lengths))
    return cache, gen


def kernel_vs_reference(fp8: bool, s: int) -> float:
    """Relative max difference of the Triton kernel (on whatever device Triton runs) and the reference."""
    from lit_deepseek.kernels.decode_attention import triton_decode_attention

    cache, gen = _filled_cache(fp8)
    layer = cache[0]
    b = cache.batch
    # the chunk's own tokens are written before attending, as in the model
    cache.new_counts = None
    layer.write(torch.randn(b, s, 32, generator=gen), torch.randn(b, s, 16, generator=gen))
    q_lat, q_rope = torch.randn(b, s, 4, 32, generator=gen), torch.randn(b, s, 4, 16, generator=gen)
    ref = layer.attend_reference(q_lat, q_rope, 0.2)
    out = triton_decode_attention(layer, q_lat, q_rope, 0.2)
    return ((out - ref).abs().max() / ref.abs().max()).item()


def test_triton_decode_kernel_matches_reference_in_interpreter() -> None:
    """TRITON_INTERPRET=1 must be set before triton is imported: a fresh process runs the kernel on CPU."""
    pytest.importorskip("triton")
    code = ("import sys; sys.path.insert(0, 'tests'); import test_generate as t; "
            "print([t.kernel_vs_reference(f, s) for f in (False, True) for s in (1, 2)])")
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    errors = ast.literal_eval(proc.stdout.strip().splitlines()[-1])
    assert len(errors) == 4 and max(errors) < 1e-5, errors


def test_flash_mla_layout_is_a_view_of_our_pages() -> None:
    from lit_deepseek.kernels.decode_attention import flash_mla_inputs

    cache, gen = _filled_cache(False, block_size=64)
    layer = cache[0]
    q_lat, q_rope = torch.randn(3, 1, 4, 32, generator=gen), torch.randn(3, 1, 4, 16, generator=gen)
    args = flash_mla_inputs(layer, q_lat, q_rope)
    k_cache, table, seqlens = args["k_cache"], args["block_table"], args["cache_seqlens"]
    assert k_cache.shape[1:] == (64, 1, 48) and k_cache.data_ptr() == cache.kv.data_ptr()
    assert args["q"].shape == (3, 1, 4, 48) and args["head_dim_v"] == 32 and table.dtype == torch.int32
    assert seqlens.tolist() == [38, 6, 71] and seqlens.dtype == torch.int32
    dense = layer.gather(torch.float32)
    for b, n in enumerate(seqlens.tolist()):  # FlashMLA's addressing: token t at page table[b, t // 64], slot t % 64
        t = torch.arange(n - 1)
        tokens = k_cache[table[b, t // 64].long(), t % 64, 0]
        assert torch.equal(tokens, dense[b, : n - 1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("s", [1, 3])
def test_triton_decode_kernel_matches_reference_on_gpu_at_v3_shape(fp8: bool, s: int) -> None:
    pytest.importorskip("triton")
    from lit_deepseek.config import MLAConfig
    from lit_deepseek.kernels.decode_attention import triton_decode_attention

    mla = MLAConfig(d_model=7168, d_latent=512, num_heads=128, qk_nope_head_dim=128, qk_rope_head_dim=64,
                    v_head_dim=128, max_context_length=4096)
    lengths = torch.tensor([1, 700, 3000, 64, 2047, 129])
    dev = torch.device("cuda")
    cache = PagedLatentCache(mla, 1, (lengths + s).tolist(), dtype=torch.bfloat16, device=dev, fp8=fp8)
    gen = torch.Generator(device=dev).manual_seed(0)
    b, t = len(lengths), int(lengths.max()) + s
    cache.new_counts = lengths.to(dev)
    kv = torch.randn(b, t, 512, device=dev, generator=gen, dtype=torch.bfloat16)
    cache[0].write(kv, torch.randn(b, t, 64, device=dev, generator=gen, dtype=torch.bfloat16))
    cache.advance(lengths.to(dev))
    cache[0].write(torch.randn(b, s, 512, device=dev, generator=gen, dtype=torch.bfloat16),
                   torch.randn(b, s, 64, device=dev, generator=gen, dtype=torch.bfloat16))
    q_lat = torch.randn(b, s, 128, 512, device=dev, generator=gen, dtype=torch.bfloat16)
    q_rope = torch.randn(b, s, 128, 64, device=dev, generator=gen, dtype=torch.bfloat16)
    scale = 192 ** -0.5
    ref = cache[0].attend_reference(q_lat.float(), q_rope.float(), scale)
    out = triton_decode_attention(cache[0], q_lat, q_rope, scale).float()
    assert (out - ref).abs().max() / ref.abs().max() < 2e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_generate_on_gpu_with_the_kernel_matches_the_reference_path() -> None:
    model = _model().cuda()
    ids = torch.randint(0, 97, (4, 9), generator=torch.Generator().manual_seed(9)).cuda()
    lengths = torch.tensor([9, 3, 6, 1]).cuda()
    out = generate(model, ids, 12, prompt_lengths=lengths)
    cpu = generate(model.cpu(), ids.cpu(), 12, prompt_lengths=lengths.cpu())
    assert torch.equal(out.cpu(), cpu)


def test_cached_perplexity_is_exact_in_full_precision_and_close_in_fp8() -> None:
    from lit_deepseek.generate import cached_perplexity

    model = _model()
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        logits = model(ids)[:, :-1]
        full = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).exp().item()
    assert cached_perplexity(model, ids, chunk=7, block_size=8) == pytest.approx(full, rel=1e-5)
    fp8 = cached_perplexity(model, ids, chunk=7, block_size=8, use_fp8_kv=True)
    assert fp8 != full and fp8 == pytest.approx(full, rel=0.02)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fp8", [False, True])
def test_cuda_graph_decode_equals_eager_decode_in_bf16(fp8: bool) -> None:
    model = _model(**{"mla.d_model": 64, "moe.expert_intermediate_size": 32, "dense_intermediate_size": 64})
    model = model.to("cuda", torch.bfloat16)
    ids = torch.randint(0, 97, (3, 10), generator=torch.Generator().manual_seed(12)).cuda()
    lengths = torch.tensor([10, 4, 7]).cuda()
    eager = generate(model, ids, 16, prompt_lengths=lengths, cuda_graph=False, use_fp8_kv=fp8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a capture failure would warn and fall back
        graphed = generate(model, ids, 16, prompt_lengths=lengths, cuda_graph=True, use_fp8_kv=fp8)
    assert torch.equal(eager, graphed)


def test_self_speculative_decoding_with_mtp_equals_greedy() -> None:
    from lit_deepseek.generate import generate_speculative

    model = _model()
    with torch.no_grad():  # the main model picks token 0 or 1 by context; the drafter always says 0
        model.head.weight[0] *= 30
        model.head.weight[1] = -model.head.weight[0]
        model.mtp[0].norm.weight.zero_()
    ids = torch.randint(0, 97, (1, 6), generator=torch.Generator().manual_seed(13))
    plain = generate(model, ids, 15)
    assert {0, 1} <= set(plain[0, 6:].tolist())
    spec, stats = generate_speculative(model, ids, 15)
    assert torch.equal(spec, plain)  # accepted and rejected drafts both happened, the text is greedy's
    assert 0.0 < stats["acceptance"] < 1.0 and 1.0 < stats["tokens_per_forward"] < 2.0
    eos = int(plain[0, 6 + 4])
    stopped, _ = generate_speculative(model, ids, 15, eos_id=eos)
    assert stopped[0, -1].item() == eos and torch.equal(stopped[0], plain[0, : stopped.shape[1]])
