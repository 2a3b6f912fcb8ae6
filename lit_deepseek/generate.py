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

import time
from collections.abc import Callable
from pathlib import Path
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
             on_tokens: Callable[[Tensor], None] | None = None, cuda_graph: bool | None = None) -> Tensor:
    """Continue each prompt of input_ids [B, S] by up to max_new_tokens tokens -> LongTensor [B, S + n].

    temperature 0 is greedy; top_k / top_p restrict sampling; `seed` seeds a private generator
    (same seed, same tokens). A sequence stops at `eos_id` (which is kept) and is padded with
    `pad_id` (default: eos_id, else 0); generation ends when every sequence has stopped.
    use_fp8_kv / use_flash_mla default to the model's `model.mla` settings. `on_tokens` receives
    each step's tokens [B] (streaming). cuda_graph (default: on for bf16/fp16 models on CUDA)
    replays the one-token decode step as a CUDA graph.
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
    decode: Callable[[Tensor], Tensor] | None = None
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
        if decode is None:
            decode = _decoder(model, cache, b, device, dtype, cuda_graph)
        logits = decode(sampled[:, None])  # stopped rows run on, unseen
        cache.advance(1)
    return _assemble(input_ids, lengths_dev, new[:, :steps], pad_id)


def _decoder(model: nn.Module, cache: PagedLatentCache, batch: int, device: torch.device, dtype: torch.dtype,
             cuda_graph: bool | None) -> Callable[[Tensor], Tensor]:
    """The one-token decode step: eager, or captured once as a CUDA graph and replayed."""

    def eager(token: Tensor) -> Tensor:
        return _last_logits(model, token, cache, None)

    if cuda_graph is None:
        cuda_graph = device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)
    if not cuda_graph or device.type != "cuda":
        return eager
    from lit_deepseek.kernels.decode_attention import warn_once

    static_token = torch.zeros(batch, 1, dtype=torch.long, device=device)
    try:
        # warm-up (compiles kernels) writes the next slot, which the real step overwrites: harmless
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                cache.step_memo.clear()
                eager(static_token)
        torch.cuda.current_stream(device).wait_stream(side)
        cache.step_memo.clear()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_logits = eager(static_token)
    except Exception as exc:  # an op that cannot be captured (e.g. a host sync): decode eagerly
        warn_once("cuda_graph", f"generate: CUDA graph capture failed ({str(exc).splitlines()[0][:200]}); "
                                "decoding without graphs")
        cache.step_memo.clear()
        return eager

    def replay(token: Tensor) -> Tensor:
        static_token.copy_(token)
        graph.replay()
        return static_logits.clone()

    return replay


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


# ------------------------------------------------------------------------------------ model loading
def load_for_generation(configs: list[str] | None = None, ckpt_path: str | None = None, model_dir: str | None = None,
                        overrides: dict[str, Any] | None = None, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None) -> tuple[nn.Module, Any]:
    """(model in eval mode, the run's DeepSeekConfig or None) from a training checkpoint or a directory.

    ckpt_path: a Lightning ``.ckpt`` file, a distributed checkpoint folder (what the parallel
    strategy writes), or ``last`` / ``best`` (in the config's checkpoint folder). model_dir: a
    Hugging Face directory (config.json) or a native one (model.yaml). Raises ConfigError.
    """
    from lit_deepseek.checkpoint.hf import CheckpointError, load_hf_model, load_native_model
    from lit_deepseek.config import ConfigError, load_config

    if model_dir is not None:
        path = Path(model_dir)
        try:
            if (path / "config.json").is_file():
                model = load_hf_model(path, dtype=dtype, device=device)
            elif (path / "model.yaml").is_file():
                model = load_native_model(path, dtype=dtype, device=device)
            else:
                raise ConfigError(f"generate: --model {path} holds neither config.json (Hugging Face) nor "
                                  "model.yaml (native)")
        except (CheckpointError, FileNotFoundError) as exc:
            raise ConfigError(f"generate: {exc}") from None
        if overrides:
            _apply_mla_overrides(model.cfg, overrides)
        return model.eval(), None

    cfg = load_config(*configs, overrides=overrides)
    path = _resolve_ckpt(cfg, ckpt_path)
    from lit_deepseek.model import DeepSeekV3

    with torch.device("meta"):
        model = DeepSeekV3(cfg.model)
    model.to_empty(device=device)
    model.init_weights(seed=0)  # buffers; every parameter is overwritten by the checkpoint
    if path.is_dir():
        from lit_deepseek.parallel.checkpoint import load_checkpoint

        try:
            load_checkpoint(path, [model])
        except Exception as exc:  # a folder of another model: DCP names the first mismatch
            raise ConfigError(f"generate: --ckpt_path {path} does not fit the config's model: "
                              f"{str(exc).splitlines()[0]}") from None
    else:
        state = torch.load(path, map_location=device, weights_only=True)
        weights = {k.removeprefix("model."): v for k, v in state.get("state_dict", {}).items()
                   if k.startswith("model.")}
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if missing or unexpected:
            names = ", ".join((missing or unexpected)[:3])
            raise ConfigError(f"generate: --ckpt_path {path} does not fit the config's model "
                              f"({'missing' if missing else 'unexpected'}: {names})")
    model.tie_weights()
    if dtype is not None:
        model.to(dtype)
    return model.eval(), cfg


def _apply_mla_overrides(model_cfg: Any, overrides: dict[str, Any]) -> None:
    from lit_deepseek.config import ConfigError

    for key, value in overrides.items():
        if not key.startswith("model.mla.") or not hasattr(model_cfg.mla, key.split(".")[-1]):
            raise ConfigError(f"generate: {key}: with --model only model.mla decode settings can be overridden")
        setattr(model_cfg.mla, key.split(".")[-1], value)


def _resolve_ckpt(cfg: Any, ckpt_path: str | None) -> Path:
    from lit_deepseek.config import ConfigError

    if ckpt_path is None:
        raise ConfigError("generate: --ckpt_path is required with --config (or pass --model DIR)")
    if ckpt_path in ("last", "best"):
        from lit_deepseek.training.callbacks import checkpoint_dir

        path = checkpoint_dir(cfg) / f"{ckpt_path}.ckpt"
    else:
        path = Path(ckpt_path)
    if not path.exists():
        raise ConfigError(f"generate: --ckpt_path {path}: no such checkpoint file or folder")
    if path.is_dir() and not (path / ".metadata").is_file():
        raise ConfigError(f"generate: --ckpt_path {path} is a folder but not a distributed checkpoint (no .metadata)")
    return path


# ------------------------------------------------------------------------------------ command line
def generate_main(argv: list[str]) -> int:
    """`lit-deepseek generate (--config FILE --ckpt_path CKPT | --model DIR) --prompt TEXT ...`."""
    import argparse
    import json
    import sys

    from lit_deepseek.config import ConfigError, dotted_overrides

    parser = argparse.ArgumentParser(
        prog="lit-deepseek generate",
        description="Sample text from a trained checkpoint (greedy by default). One prompt streams to the "
                    "terminal; several prompts (or --output) give JSONL lines {prompt, completion, new_tokens}. "
                    "Extra --model.mla.KEY VALUE flags override decode settings (use_fp8_kv, use_flash_mla).")
    src = parser.add_argument_group("model")
    src.add_argument("--config", "-c", action="append", help="the run's YAML config (repeatable)")
    src.add_argument("--ckpt_path", help="a .ckpt file, a distributed checkpoint folder, or last / best")
    src.add_argument("--model", dest="model_dir", help="a Hugging Face (config.json) or native (model.yaml) directory")
    src.add_argument("--tokenizer", help="tokenizers JSON (default: data.tokenizer of the config, tokenizer.json "
                                         "in --model, else bytes)")
    src.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    src.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                     help="default: bfloat16 on CUDA, float32 on CPU")
    gen = parser.add_argument_group("generation")
    gen.add_argument("--prompt", "-p", action="append", default=[], help="a prompt (repeatable)")
    gen.add_argument("--prompts_file", help="a text file, one prompt per line")
    gen.add_argument("--max_new_tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top_k", type=int, default=None)
    gen.add_argument("--top_p", type=float, default=None)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--ignore_eos", action="store_true", help="do not stop at the tokenizer's end-of-text token")
    gen.add_argument("--batch_size", type=int, default=32, help="prompts decoded together")
    gen.add_argument("--output", "-o", help="write JSONL here instead of stdout")
    gen.add_argument("--timing", action="store_true",
                     help="after a short warm-up, print {new_tokens, seconds, tokens_per_s} of the generation to stderr")
    args, rest = parser.parse_known_args(argv)
    overrides = dotted_overrides(rest)

    # ---- every check that needs no model
    try:
        check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    except ValueError as exc:
        raise ConfigError(f"generate: --{exc}") from None
    if args.batch_size < 1:
        raise ConfigError(f"generate: --batch_size: must be >= 1, got {args.batch_size}")
    if (args.model_dir is None) == (args.config is None):
        raise ConfigError("generate: give either --config FILE --ckpt_path CKPT or --model DIR")
    prompts = list(args.prompt)
    if args.prompts_file:
        file = Path(args.prompts_file)
        if not file.is_file():
            raise ConfigError(f"generate: --prompts_file {file}: file not found")
        prompts += [line for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ConfigError("generate: no prompts: pass --prompt TEXT or --prompts_file FILE")
    if any(not p for p in prompts):
        raise ConfigError("generate: --prompt: prompts must not be empty")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("generate: --device cuda: no CUDA GPU is available")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)

    # ---- tokenizer and the prompt-length check, still before the model is loaded
    from lit_deepseek.data.tokenizer import load_tokenizer

    run_cfg = None
    if args.config:
        from lit_deepseek.config import load_config

        run_cfg = load_config(*args.config, overrides=overrides)
        _resolve_ckpt(run_cfg, args.ckpt_path)
        tok_path = args.tokenizer or run_cfg.data.tokenizer
        model_cfg = run_cfg.model
    else:
        from lit_deepseek.checkpoint.hf import CheckpointError, read_hf_config, read_native_config

        tok_path = args.tokenizer
        if tok_path is None and (Path(args.model_dir) / "tokenizer.json").is_file():
            tok_path = str(Path(args.model_dir) / "tokenizer.json")
        try:
            model_cfg = (read_native_config(args.model_dir) if (Path(args.model_dir) / "model.yaml").is_file()
                         else _hf_model_config(read_hf_config, args.model_dir))
        except (CheckpointError, FileNotFoundError) as exc:
            raise ConfigError(f"generate: {exc}") from None
    tok = load_tokenizer(tok_path)
    tok.check_vocab(model_cfg.vocab_size)
    encoded = tok.encode_batch(prompts)
    longest = max(len(e) for e in encoded)
    if min(len(e) for e in encoded) == 0:
        raise ConfigError("generate: a prompt encodes to no tokens")
    limit = model_cfg.mla.max_context_length
    if longest + args.max_new_tokens > limit:
        raise ConfigError(f"generate: --max_new_tokens: the longest prompt ({longest} tokens) + {args.max_new_tokens} "
                          f"exceeds model.mla.max_context_length ({limit})")

    model, _ = load_for_generation(args.config, args.ckpt_path, args.model_dir, overrides, device, dtype)
    eos = None if args.ignore_eos else tok.eos_id
    stream = len(prompts) == 1 and args.output is None
    out_file = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout  # noqa: SIM115
    if args.timing:  # compile kernels and fill allocator caches outside the timed region
        ids, lengths = pad_prompts(encoded[:args.batch_size], pad_id=tok.pad_id, device=device)
        generate(model, ids, min(2, args.max_new_tokens), prompt_lengths=lengths, pad_id=tok.pad_id)
    _sync(device)
    started, produced = time.perf_counter(), 0
    try:
        for start in range(0, len(prompts), args.batch_size):
            chunk = encoded[start:start + args.batch_size]
            ids, lengths = pad_prompts(chunk, pad_id=tok.pad_id, device=device)
            printer = _Streamer(tok, prompts[0]) if stream else None
            seed = None if args.seed is None else args.seed + start
            out = generate(model, ids, args.max_new_tokens, args.temperature, args.top_k, args.top_p, eos_id=eos,
                           prompt_lengths=lengths, pad_id=tok.pad_id, seed=seed,
                           on_tokens=printer.push if printer else None)
            steps = out.shape[1] - ids.shape[1]
            produced += sum(min(steps, _stop_index(out[i, len(c):len(c) + steps].tolist(), eos))
                            for i, c in enumerate(chunk))
            if printer:
                printer.finish()
                continue
            for i, prompt_ids in enumerate(chunk):
                new = out[i, len(prompt_ids):len(prompt_ids) + steps].tolist()
                if eos is not None and eos in new:  # the stop token and the padding after it
                    new = new[:new.index(eos)]
                record = {"prompt": prompts[start + i], "completion": tok.decode(new), "new_tokens": len(new)}
                out_file.write(json.dumps(record, ensure_ascii=False) + "\n")
            out_file.flush()
    finally:
        if args.output:
            out_file.close()
    _sync(device)
    if args.timing:
        seconds = time.perf_counter() - started
        print(json.dumps({"new_tokens": produced, "seconds": round(seconds, 4),
                          "tokens_per_s": round(produced / seconds, 2)}), file=sys.stderr)
    return 0


def _stop_index(new: list[int], eos: int | None) -> int:
    """Tokens generated before the sequence stopped (the EOS counts)."""
    return new.index(eos) + 1 if eos is not None and eos in new else len(new)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _hf_model_config(read_hf_config: Callable[[Any], dict], path: str) -> Any:
    from lit_deepseek.checkpoint.hf import model_config_from_hf

    return model_config_from_hf(read_hf_config(path))


class _Streamer:
    """Print one sequence's text as its tokens arrive (holding back an incomplete UTF-8 character)."""

    def __init__(self, tok: Any, prompt: str) -> None:
        import sys

        self.tok, self.ids, self.shown, self.out = tok, [], "", sys.stdout
        self.stopped = False
        self.out.write(prompt)
        self.out.flush()

    def push(self, token: Tensor) -> None:
        t = int(token[0])
        if self.stopped or t == self.tok.eos_id or t == self.tok.pad_id:
            self.stopped = True
            return
        self.ids.append(t)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return
        self.out.write(text[len(self.shown):])
        self.out.flush()
        self.shown = text

    def finish(self) -> None:
        text = self.tok.decode(self.ids)
        self.out.write(text[len(self.shown):] + "\n")
        self.out.flush()


# ------------------------------------------------------------------------------------ cache quality
@torch.no_grad()
def cached_perplexity(model: nn.Module, ids: Tensor, chunk: int = 64, use_fp8_kv: bool = False,
                      prefill: int = 1, block_size: int = 64) -> float:
    """Perplexity of ids [B, T] read through the decode path: the first `prefill` tokens by the
    training form, the rest in chunks of `chunk` tokens attending over the paged cache (so every
    later token sees the cache, quantized when use_fp8_kv). Measures what the cache format costs."""
    b, t = ids.shape
    cache = PagedLatentCache(model.cfg.mla, len(model.layers), [t] * b, block_size=block_size,
                             dtype=next(model.parameters()).dtype, device=ids.device, fp8=use_fp8_kv)
    nll, count = torch.zeros((), dtype=torch.float64, device=ids.device), 0
    start = 0
    while start < t - 1:
        end = min(t - 1, start + (prefill if start == 0 else chunk))
        h, _ = model(ids[:, start:end], caches=cache, return_hidden=True)
        cache.advance(end - start)
        logits = model.head(h).float()
        nll += torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, start + 1:end + 1].flatten(),
                                                 reduction="sum").double()
        count += logits.shape[0] * logits.shape[1]
        start = end
    return float(torch.exp(nll / count))


# ------------------------------------------------------------------------------------ speculative decoding
@torch.no_grad()
def generate_speculative(model: nn.Module, input_ids: Tensor, max_new_tokens: int, eos_id: int | None = None,
                         block_size: int = 64) -> tuple[Tensor, dict[str, float]]:
    """Greedy self-speculative decoding with the first MTP module as the drafter (one sequence).

    Each step feeds the last token and the MTP's draft of the token after it to the main model
    (two positions, one forward): if the main model's greedy token equals the draft, both are
    kept and the second position gives one more token. The result equals greedy `generate`
    (the main model decides every token). Returns (ids [1, S + n], {"acceptance": accepted
    drafts / drafts, "tokens_per_forward": new tokens / main-model forwards}).
    """
    check_sampling(max_new_tokens, 0.0, None, None)
    if not len(model.mtp):
        raise ValueError("generate_speculative: the model has no MTP module (model.mtp_depth = 0)")
    if input_ids.shape[0] != 1:
        raise ValueError(f"generate_speculative: one sequence at a time, got a batch of {input_ids.shape[0]}")
    cfg, mtp = model.cfg, model.mtp[0]
    n = input_ids.shape[1]
    if n + max_new_tokens + 1 > cfg.mla.max_context_length:
        raise ValueError(f"max_new_tokens: prompt ({n}) + {max_new_tokens} new tokens exceed "
                         f"model.mla.max_context_length ({cfg.mla.max_context_length})")
    dtype, device = next(model.parameters()).dtype, input_ids.device
    capacity = [n + max_new_tokens + 1]
    main = PagedLatentCache(cfg.mla, len(model.layers), capacity, block_size=block_size, dtype=dtype, device=device,
                            fp8=cfg.mla.use_fp8_kv)
    draft_cache = PagedLatentCache(cfg.mla, 1, capacity, block_size=block_size, dtype=dtype, device=device,
                                   fp8=cfg.mla.use_fp8_kv)

    def draft(h: Tensor, next_ids: Tensor) -> Tensor:
        """Run the MTP module over positions of `h` (cached) -> its greedy guess after the last one."""
        cos, sin = model.rope(draft_cache.positions(h.shape[1]))
        x = mtp(h, model.embed(next_ids), cos, sin, None, cache=draft_cache[0])
        draft_cache.advance(h.shape[1])
        return model.head(x[:, -1]).argmax(dim=-1)

    h, _ = model(input_ids, caches=main, return_hidden=True)
    main.advance(n)
    tokens = [int(model.head(h[:, -1]).argmax(dim=-1))]
    guess = draft(h, torch.cat((input_ids[:, 1:], torch.tensor([tokens[-1:]], device=device)), dim=1))
    forwards, drafts, accepted = 1, 0, 0
    while len(tokens) < max_new_tokens and not (eos_id is not None and tokens[-1] == eos_id):
        pair = torch.cat((torch.tensor([tokens[-1:]], device=device), guess[:, None]), dim=1)
        h, _ = model(pair, caches=main, return_hidden=True)
        greedy = model.head(h[0]).argmax(dim=-1).tolist()  # after the last token, after the draft
        forwards += 1
        drafts += 1
        if greedy[0] == int(guess):
            accepted += 1
            main.advance(2)
            tokens += greedy
            guess = draft(h, torch.tensor([greedy], device=device))
        else:
            main.advance(1)  # the draft's cache slot is overwritten by the next step
            tokens.append(greedy[0])
            guess = draft(h[:, :1], torch.tensor([greedy[:1]], device=device))
    tokens = tokens[:max_new_tokens]
    if eos_id is not None and eos_id in tokens:
        tokens = tokens[: tokens.index(eos_id) + 1]
    out = torch.cat((input_ids, torch.tensor([tokens], device=device)), dim=1)
    return out, {"acceptance": accepted / max(1, drafts), "tokens_per_forward": len(tokens) / forwards}
