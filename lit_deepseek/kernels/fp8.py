"""FP8 training of the linear layers and the routed experts: DeepSeek-V3's fine-grained recipe.

Two recipes (`training.fp8_recipe`); both quantize to float8 e4m3 with power-of-two float32 scales
(exact to apply) and accumulate in float32. Master weights, gradients and optimizer states keep
their dtype; only the operands of the matrix products are quantized, freshly at every call (but
see "Weight reuse across micro-batches" below for the blockwise weights).

**blockwise** (default; DeepSeek-V3's recipe): activations and gradients in 1x128 tiles (one scale
per row and 128 channels of the contraction dimension), weights in 128x128 blocks. Per product
of `y = x @ w.T` (x [tokens, K], w [N, K]):

| product | left operand | right operand |
| --- | --- | --- |
| forward  `y = x @ w.T`       | x: 1x128 along K (per token)       | w: 128x128 blocks |
| input gradient `dx = dy @ w` | dy: 1x128 along N (per token)      | w: the same 128x128 blocks, transposed |
| weight gradient `dw = dy.T @ x` | dy.T: 1x128 along the tokens (per output channel) | x.T: 1x128 along the tokens (per input channel) |

The input gradient takes the blocks of w.T, which are those of w transposed, with the same
scales (a 128x128 block stays a block under transposition). Dimensions that are not multiples of 128 are
zero-padded (zeros add nothing to a product). Dense layers run cuBLAS block scaling (Hopper)
through `torch.nn.functional.scaled_mm`; the routed experts run the Triton grouped kernels of
`lit_deepseek.kernels.fp8_triton` (torch has no block-scaled grouped GEMM), or, without Triton or
with LIT_DEEPSEEK_FP8_GROUPED=loop, one `torch._scaled_mm` per expert (slower; warns once).

**rowwise**: one scale per row of each operand along the contraction dimension, through
`torch._scaled_mm` / `torch._scaled_grouped_mm`; the expert weight gradient stays in bf16.

What stays in BF16/FP32 (`training.fp8_exclude`, default DeepSeek-V3's choice): the embedding, the
output head and the MoE router (`gate`) by name; norms, RoPE, the attention core
(softmax(QK^T)V) and the loss have no linear layer and are never converted. MLA projections,
dense and shared-expert MLPs, routed experts and the MTP projection run in FP8.

Layers keep their class hierarchy and parameter names (`convert_to_fp8` swaps `__class__`), so
checkpoints, optimizers and parallel plans are unaffected; DTensor (tensor-parallel) weights are
multiplied shard by shard. Each product has a reference path that runs the same quantization in
float32 (quantize, dequantize, multiply): the path used on CPU (`emulate=None` picks it for
non-CUDA inputs) and the one the kernel tests compare against. `fp8_enabled = False` gives back
the plain layer.

Use: `convert_to_fp8(model, recipe=..., exclude=...)` before `torch.compile`. Each product is a
custom op pair (forward, backward) that the compiler keeps opaque: see `fp8_linear`.

**Weight reuse across micro-batches** (blockwise recipe). With gradient accumulation the weights
do not change between the micro-batches of an optimizer step, so the blockwise ops take every
weight's 128x128 blocks through `weight_blocks` (the gate/up products: both weights' blocks side by
side), which follows the phase set by `fp8_weight_reuse(phase)`:

* "off" (the default): quantize at every call, keep nothing;
* "fill": quantize each weight's forward blocks and keep them (one entry per weight or gate/up
  pair); the backward of the same micro-batch takes them too;
* "reuse": return the kept blocks when they are valid and were written by the latest "fill" (this
  step's first micro-batch), else quantize and keep.

Only the forward blocks are kept: the input gradient's blocks of w.T are the kept ones transposed
(`transposed_blocks`, one byte read and written per element, bit for bit the quantization of w.T),
so outside "off" each weight is quantized once per step instead of twice per micro-batch.
`lit_deepseek.training.step.LocalPlan` runs the first micro-batch of a step of several (forward and
backward) in "fill" and the others in "reuse"; a step of one micro-batch stays "off". An entry is
valid for the very tensor objects it was filled from (a weak reference compared with `is`, never an
id or address, which are reused) at the shape, dtype, device and version counter (`w._version`)
recorded at the fill. The version is a second guard, not the main one: fused AdamW updates the
parameters without bumping it, which is why "fill" always quantizes anew; within a step nothing
writes the weights. A weight that arrives as a per-call temporary (a DTensor's local shard under
tensor parallelism, any view) never hits: correct, no gain. An eager plain `nn.Parameter` reaches the
custom ops as the same Python object, forward and backward, and so does a compiled one (aot_eager and
inductor on CPU; on CUDA the graphed test below sees the hits). The phase is module state read inside
the ops at every call: they are opaque to torch.compile, so their Python runs each time. Kept blocks
hold about 1 byte per blockwise FP8 weight parameter plus one float32 scale per 128x128 block
(`lit_deepseek.estimates.fp8_weight_cache_bytes` counts them); an entry lives as long as its weight
(`clear_fp8_weight_cache` drops all). Kept blocks are written in place at the next fill, never
replaced, so that CUDA graphs (the first micro-batch's graph, captured in "fill", writes them at each
replay; the later micro-batches' graph reads them) stay valid. `tests/test_fp8.py` checks the steps
bit for bit against LIT_DEEPSEEK_FP8_WEIGHT_CACHE=0 on CPU and, under CUDA graphs, within the FP8
bounds on a GPU. `lit_deepseek.parallel.plan.DistributedPlan` does the same on layouts of plain
local weights (TP 1, PP 1, ZeRO 0 or 1, any EP and DP) and keeps the phase "off" on the others
(FSDP2 frees and refills the unsharded parameters' storage around each forward and backward, which
this key was not checked against, and pipeline schedules interleave micro-batches). LIT_DEEPSEEK_FP8_WEIGHT_CACHE=0
keeps every phase "off" (the reference path; use it when the kept bytes do not fit). The row-wise
recipe quantizes at every call.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import warnings
import weakref
from collections.abc import Iterator, Sequence
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_deepseek.config import ConfigError
from lit_deepseek.kernels import is_dtensor
from lit_deepseek.kernels.swiglu import swiglu
from lit_deepseek.model.moe import GroupedExperts, SwiGLU
from lit_deepseek.precision import compute_dtype

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
BLOCK = 128
RECIPES = ("blockwise", "rowwise")
#: module names (or glob patterns) that stay in high precision: embedding, output head, MoE router
DEFAULT_EXCLUDE = ("embed", "head", "gate")
DEFAULT_SKIP = DEFAULT_EXCLUDE

_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


def _pow2_scale(amax: Tensor) -> Tensor:
    """The largest power of two 2^s with amax * 2^s <= 448 (the e4m3 maximum), computed exactly from
    the float32 bits of amax (amax = (1 + m) 2^e, 448 = 1.75 * 2^8: s = 8 - e if 1 + m <= 1.75, else
    7 - e), so that every implementation (these torch ops, the Triton quantizers) agrees bit for bit;
    amax is clamped to >= 1e-12."""
    bits = amax.float().clamp(min=1e-12).view(torch.int32)
    e = ((bits >> 23) & 0xFF) - 127
    s = torch.where((bits & 0x7FFFFF) <= 0x600000, 8 - e, 7 - e)
    return ((s + 127) << 23).view(torch.float32)


def _to_e4m3(x: Tensor, scale: Tensor) -> Tensor:
    return (x.float() * scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


# ---------------------------------------------------------------------------------- quantization
def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [..., K] -> (float8 e4m3 values, float32 dequantization scale [..., 1]) per row.

    The scale is a power of two chosen so that the row's largest magnitude fits under 448.
    """
    scale = _pow2_scale(x.detach().abs().amax(dim=-1, keepdim=True))
    return _to_e4m3(x, scale), scale.reciprocal()


def _pad_to(x: Tensor, dim: int, multiple: int = BLOCK) -> Tensor:
    """Zero-pad dimension `dim` of x up to a multiple of `multiple` (no copy when aligned)."""
    size = x.shape[dim]
    pad = -size % multiple
    if pad == 0:
        return x
    dim = dim % x.dim()
    return F.pad(x, [0, 0] * (x.dim() - 1 - dim) + [0, pad])


def quantize_1x128(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [..., K] -> (e4m3 [..., Kp], float32 dequantization scales [..., Kp/128]): one scale per
    1x128 tile along the last dimension, which is zero-padded to Kp, a multiple of 128."""
    tiles = _pad_to(x, -1).unflatten(-1, (-1, BLOCK))
    scale = _pow2_scale(tiles.detach().abs().amax(dim=-1, keepdim=True))
    return _to_e4m3(tiles, scale).flatten(-2), scale.squeeze(-1).reciprocal()


def quantize_128x128(w: Tensor) -> tuple[Tensor, Tensor]:
    """w [..., N, K] -> (e4m3 [..., Np, Kp], float32 dequantization scales [..., Np/128, Kp/128]):
    one scale per 128x128 block; both dimensions zero-padded to multiples of 128."""
    w = _pad_to(_pad_to(w, -1), -2)
    *lead, n, k = w.shape
    blocks = w.reshape(*lead, n // BLOCK, BLOCK, k // BLOCK, BLOCK)
    scale = _pow2_scale(blocks.detach().abs().amax(dim=(-3, -1), keepdim=True))
    q = _to_e4m3(blocks, scale).reshape(*lead, n, k)
    return q, scale.reshape(*lead, n // BLOCK, k // BLOCK).reciprocal()


def quantize_1x128_t(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [T, N] -> `quantize_1x128` of x.T with N padded to a multiple of 128: ([Np, Tp] e4m3,
    [Np, Tp/128] scales), the 1x128 tiles along the tokens that weight gradients take."""
    return quantize_1x128(_pad_to(x, -1).t())


def quantize_1x128_dual(x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """x [T, C] -> (*`quantize_1x128`(x), *`quantize_1x128_t`(x)): the two tilings an output gradient
    takes in a backward pass (along C for the input gradient, along T for the weight gradient)."""
    return (*quantize_1x128(x), *quantize_1x128_t(x))


QUANT_MODES = ("auto", "triton", "torch")


def _quant_backend() -> str:
    """The quantizer backend for CUDA tensors: LIT_DEEPSEEK_FP8_QUANT = auto (the default: the
    one-kernel Triton quantizers when triton imports, else the torch ones with a warning), triton
    (required) or torch (the plain reference quantizers)."""
    mode = os.environ.get("LIT_DEEPSEEK_FP8_QUANT", "auto")
    if mode not in QUANT_MODES:
        raise ValueError(f"LIT_DEEPSEEK_FP8_QUANT={mode!r}: must be one of {', '.join(QUANT_MODES)}")
    if mode == "torch":
        return mode
    try:
        import triton  # noqa: F401
    except ImportError:
        if mode == "triton":
            raise RuntimeError("LIT_DEEPSEEK_FP8_QUANT=triton: triton is not installed") from None
        _warn_once("quant", "FP8: triton is not installed, so the FP8 quantizers run as several torch "
                   "kernels each (slower); install triton for the one-kernel quantizers")
        return "torch"
    return "triton"


# ---------------------------------------------------------------------------------- kernel check
# The Triton quantizers and the block transpose give the torch reference's bits by construction,
# and tests/test_fp8.py checks that on random inputs. Three times a Triton build miscompiled one of
# them for some shapes and strides only (wrong e4m3 bits, no error), on a GPU, never under the
# interpreter. So the first call of each kernel at a new signature is checked against the torch
# reference, bit for bit; a mismatch warns once, naming the kernel and the shapes, and that signature
# runs the reference from then on (right bits, slower), so a miscompile cannot corrupt training
# silently. A signature is what Triton compiles a separate kernel for, plus our tile boundaries: per
# operand its dtype, device, whether its address is 16-byte aligned, and per dimension and stride
# whether it is 1, a multiple of 16 or of 128. Token counts that change at every step (expert
# parallelism) thus fall into a few signatures. The check costs one reference computation and one
# host sync per signature (a training run has a few dozen, nearly all in its first step); none runs
# while a CUDA graph is captured. LIT_DEEPSEEK_FP8_CHECK=0 turns it off.
_CHECK_LIMIT = 1024  # signatures checked per process at most
_checked: dict[tuple, bool] = {}  # signature -> the Triton output matched the reference
_check_counts = {"checked": 0, "mismatched": 0}
_CHECKED_FINITE = (torch.float32, torch.bfloat16, torch.float16)


def _signature(name: str, *ts: Tensor) -> tuple:
    """The kernel variant `name` runs for the operands ts (see the comment above)."""
    def kind(n: int) -> tuple[bool, bool, bool]:
        return n == 1, n % 16 == 0, n % 128 == 0

    return (name,) + tuple((t.dtype, t.device, t.data_ptr() % 16 == 0, tuple(map(kind, t.shape)),
                            tuple(map(kind, t.stride()))) for t in ts)


def _same_bits(a: tuple[Tensor, ...], b: tuple[Tensor, ...]) -> bool:
    def bits(t: Tensor) -> Tensor:
        return t.view(torch.uint8) if t.dtype == E4M3 else t

    return len(a) == len(b) and all(x.shape == y.shape and x.dtype == y.dtype and torch.equal(bits(x), bits(y))
                                    for x, y in zip(a, b, strict=True))


def checked_kernel(name: str, inputs: tuple[Tensor, ...], kernel: Any, reference: Any) -> tuple[Tensor, ...]:
    """kernel(*inputs), or reference(*inputs) where the kernel has given other bits than the
    reference at this signature (`_signature`; see the comment above). Inputs that are not all
    finite are not checked (a kernel and its reference may place NaN differently)."""
    key = _signature(name, *inputs)
    ok = _checked.get(key)
    if ok is False:
        return reference(*inputs)
    out = kernel(*inputs)
    if ok or os.environ.get("LIT_DEEPSEEK_FP8_CHECK", "1") == "0" or len(_checked) >= _CHECK_LIMIT:
        return out
    if any(_capturing(t) for t in inputs) or not all(bool(torch.isfinite(t).all()) for t in inputs if t.dtype in _CHECKED_FINITE):
        return out
    ref = reference(*inputs)
    ok = _checked[key] = _same_bits(tuple(out), tuple(ref))
    _check_counts["checked"] += 1
    if ok:
        return out
    _check_counts["mismatched"] += 1
    shapes = ", ".join(f"{str(t.dtype).replace('torch.', '')} {list(t.shape)} strides {list(t.stride())}" for t in inputs)
    _warn_once(f"check:{key}", f"FP8: the Triton kernel {name} gave other bits than its torch reference for {shapes} "
               f"on {torch.cuda.get_device_name(inputs[0].device) if inputs[0].is_cuda else inputs[0].device}; "
               "this signature now runs the reference (slower). LIT_DEEPSEEK_FP8_QUANT=torch runs the reference "
               "everywhere; please report the kernel, the signature and your triton version")
    return ref


def fp8_kernel_checks() -> dict[str, int]:
    """Signatures checked so far by `checked_kernel`, and those whose Triton kernel gave other bits
    than the reference (they run the reference now)."""
    return dict(_check_counts)


def _quantizer(name: str) -> Any:
    """The quantizer `name` of this module, or on CUDA tensors its one-kernel Triton version
    (`fp8_triton`: the same bits, checked on random inputs by tests/test_fp8.py and at each new
    signature by `checked_kernel`) unless LIT_DEEPSEEK_FP8_QUANT=torch."""
    plain = globals()[name]

    def call(t: Tensor) -> tuple[Tensor, Tensor]:
        if t.is_cuda and _quant_backend() == "triton":
            from lit_deepseek.kernels import fp8_triton

            return checked_kernel(name, (t,), getattr(fp8_triton, name), plain)
        return plain(t)

    call.__name__ = call.__qualname__ = f"{name}_dispatch"
    return call


def dequantize_1x128(q: Tensor, s: Tensor) -> Tensor:
    """Inverse of `quantize_1x128` (float32, padded shape)."""
    return (q.float().unflatten(-1, (-1, BLOCK)) * s.unsqueeze(-1)).flatten(-2)


def dequantize_128x128(q: Tensor, s: Tensor) -> Tensor:
    """Inverse of `quantize_128x128` (float32, padded shape)."""
    return q.float() * s.repeat_interleave(BLOCK, -2).repeat_interleave(BLOCK, -1)


_q_rows, _q_1x128, _q_1x128_t, _q_1x128_dual, _q_128x128 = (
    _quantizer(n) for n in ("quantize_rows", "quantize_1x128", "quantize_1x128_t", "quantize_1x128_dual", "quantize_128x128"))


# ---------------------------------------------------------------------------------- weight reuse
# See "Weight reuse across micro-batches" in the module docstring.
WEIGHT_CACHE_PHASES = ("off", "fill", "reuse")
_weight_phase = "off"  # read by the FP8 ops at every call (they are opaque to torch.compile)


class _WeightBlocks:
    """The forward 128x128 blocks (and scales) of one weight, or of gate and up side by side; valid
    for the very tensor objects it was filled from, at their recorded shape, dtype, device and
    version."""

    __slots__ = ("refs", "metas", "q", "s", "captured", "fill")

    def __init__(self, key: tuple, weights: tuple[Tensor, ...], q: Tensor, s: Tensor, captured: bool) -> None:
        self.refs = tuple(weakref.ref(w, lambda _ref, k=key: _forget(k, _ref)) for w in weights)
        self.metas = tuple(_weight_meta(w) for w in weights)
        self.q, self.s, self.captured, self.fill = q, s, captured, _fill_count

    def holds(self, weights: tuple[Tensor, ...]) -> bool:
        """Whether it was filled from these very tensor objects."""
        return len(weights) == len(self.refs) and all(r() is w for r, w in zip(self.refs, weights, strict=True))

    def matches(self, weights: tuple[Tensor, ...]) -> bool:
        """Whether its blocks are those of `weights` as they are now (same objects, shapes, versions)."""
        return self.holds(weights) and all(_weight_meta(w) == m for w, m in zip(weights, self.metas, strict=True))


_kept: dict[tuple, _WeightBlocks] = {}
_weight_cache_counts = {"hits": 0, "reused": 0, "misses": 0}
_fill_count = 0  # how many "fill" phases have begun: an entry written in the current one serves its backward


def _weight_key(weights: tuple[Tensor, ...]) -> tuple:
    # ids only find a candidate: `_WeightBlocks.matches` checks the objects themselves
    return tuple(id(w) for w in weights)


def _weight_meta(w: Tensor) -> tuple:
    return (tuple(w.shape), w.dtype, w.device, w._version)


def _forget(key: tuple, ref: weakref.ref) -> None:
    """A kept weight was freed: drop the entry it was kept under (unless another took its place)."""
    entry = _kept.get(key)
    if entry is not None and any(r is ref for r in entry.refs):
        del _kept[key]


def weight_reuse_enabled() -> bool:
    """LIT_DEEPSEEK_FP8_WEIGHT_CACHE = 1 (the default: micro-batches 2..n of a step reuse the first's
    weight blocks) or 0 (every call quantizes: the reference path)."""
    value = os.environ.get("LIT_DEEPSEEK_FP8_WEIGHT_CACHE", "1")
    if value not in ("0", "1"):
        raise ValueError(f"LIT_DEEPSEEK_FP8_WEIGHT_CACHE={value!r}: must be 0 or 1")
    return value == "1"


@contextlib.contextmanager
def fp8_weight_reuse(phase: str) -> Iterator[None]:
    """Run the FP8 products inside in weight-reuse `phase`: "off" (quantize every weight at every
    call), "fill" (quantize and keep) or "reuse" (take the kept blocks where they are valid);
    LIT_DEEPSEEK_FP8_WEIGHT_CACHE=0 makes every phase "off". See the module docstring."""
    global _weight_phase, _fill_count
    if phase not in WEIGHT_CACHE_PHASES:
        raise ValueError(f"fp8_weight_reuse: phase must be one of {', '.join(WEIGHT_CACHE_PHASES)}, got {phase!r}")
    previous, _weight_phase = _weight_phase, phase if weight_reuse_enabled() else "off"
    if _weight_phase == "fill":
        _fill_count += 1
    try:
        yield
    finally:
        _weight_phase = previous


def micro_batch_reuse(index: int, count: int) -> Any:
    """`fp8_weight_reuse` for micro-batch `index` of a step of `count`: "fill" for the first of
    several, "reuse" for the others, "off" for a step of one (nothing kept)."""
    return fp8_weight_reuse("off" if count == 1 else "fill" if index == 0 else "reuse")


def clear_fp8_weight_cache() -> None:
    """Drop every kept weight block. Never while CUDA graphs that read or write them may replay."""
    _kept.clear()
    _weight_cache_counts.update(hits=0, reused=0, misses=0)


def fp8_weight_cache_info() -> dict[str, int]:
    """Kept entries, their bytes, and the lookups that found valid blocks (hits; "reused": those of
    the "reuse" phase, i.e. a later micro-batch's) or quantized (misses) since the last
    `clear_fp8_weight_cache`."""
    nbytes = sum(e.q.numel() * e.q.element_size() + e.s.numel() * e.s.element_size() for e in _kept.values())
    return {"entries": len(_kept), "bytes": nbytes, **_weight_cache_counts}


def _capturing(t: Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _kept_blocks(weights: tuple[Tensor, ...], quantize: Any) -> tuple[Tensor, Tensor]:
    """quantize() -> the forward (blocks, scales) of `weights`, through the kept entries as the
    current phase (not "off") says."""
    phase = _weight_phase
    key = _weight_key(weights)
    entry = _kept.get(key)
    capturing = _capturing(weights[0])
    valid = entry is not None and entry.matches(weights)
    # Valid blocks written by the latest "fill" (the first micro-batch of this step) serve its own
    # backward and the "reuse" of the later micro-batches; blocks of an earlier step never do, even
    # for a weight the first micro-batch left untouched (an optimizer step may have changed it
    # without a version bump). Blocks written while a CUDA graph was captured hold data only once
    # that graph has replayed: a graph captured later reads them (the later micro-batches' graph,
    # after the first one's replay), or the same capture (the first micro-batch's backward), never
    # an eager call.
    if valid and entry.fill == _fill_count and (capturing or not entry.captured):
        _weight_cache_counts["hits"] += 1
        _weight_cache_counts["reused"] += phase == "reuse"
        return entry.q, entry.s
    _weight_cache_counts["misses"] += 1
    q, s = quantize()
    # An existing entry of the same weights is written in place, never replaced: a CUDA graph
    # captured in "fill" (the first micro-batch of a step) writes these very tensors at each replay
    # and the later micro-batches' graph reads them, so they must stay allocated, at the same
    # addresses, for as long as the graphs can replay. A new entry (a weight seen for the first
    # time, or a shape change) keeps the fresh tensors; an entry goes only when its weight is freed.
    if entry is not None and entry.holds(weights) and all(a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
                    for a, b in ((entry.q, q), (entry.s, s))):
        entry.q.copy_(q)
        entry.s.copy_(s)
        entry.metas = tuple(_weight_meta(w) for w in weights)
        entry.captured, entry.fill = capturing, _fill_count
        return entry.q, entry.s
    _kept[key] = _WeightBlocks(key, weights, q, s, capturing)
    return q, s


def transposed_blocks(q: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """The blocks of w.T from those of w: a 128x128 block stays a block under transposition, with
    the same scale, so transposing blocks and scales gives `quantize_128x128(w.transpose(-2, -1))`
    bit for bit (one byte read and written per element, against four read to quantize anew). The
    weight reuse and the Triton quantizer of a transposed view both take this path. On CUDA with the
    Triton quantizers (`LIT_DEEPSEEK_FP8_QUANT`), one tiled Triton kernel moves the bytes; this torch
    copy is the reference."""
    if q.is_cuda and _quant_backend() == "triton":
        from lit_deepseek.kernels import fp8_triton

        return checked_kernel("transposed_blocks", (q, s), fp8_triton.transposed_blocks, _transposed_blocks)
    return _transposed_blocks(q, s)


def _transposed_blocks(q: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """`transposed_blocks` by torch's copy (the reference)."""
    qt = q.view(torch.uint8).transpose(-2, -1).contiguous().view(E4M3)
    return qt, s.transpose(-2, -1).contiguous()


def _reusing(weights: tuple[Tensor, ...]) -> bool:
    return _weight_phase != "off" and not any(w.is_inference() or is_dtensor(w) for w in weights)


def weight_blocks(w: Tensor, transposed: bool = False) -> tuple[Tensor, Tensor]:
    """`quantize_128x128` of the weight w [..., N, K] (transposed: of w.transpose(-2, -1)), through
    the weight reuse (`fp8_weight_reuse`): the blocks every blockwise product takes of a weight. Only
    the forward blocks are kept; the input gradient's are their transpose."""
    if not _reusing((w,)):
        return _q_128x128(w.transpose(-2, -1) if transposed else w)
    q, s = _kept_blocks((w,), lambda: _q_128x128(w))
    return transposed_blocks(q, s) if transposed else (q, s)


def _gate_up_blocks(w1: Tensor, w3: Tensor, transposed: bool) -> tuple[Tensor, Tensor]:
    """The blocks of w1 and w3 side by side (along N forward; along the transposed N, the last
    dimension, when transposed), each weight quantized on its own, through the weight reuse (which
    keeps the forward pair and transposes it: the transpose of blocks stacked along N is the
    transposed blocks side by side along the last dimension)."""
    def quantize(transposed: bool) -> tuple[Tensor, Tensor]:
        dim = -1 if transposed else -2
        (q1, s1), (q3, s3) = (_q_128x128(w.transpose(-2, -1) if transposed else w) for w in (w1, w3))
        return _cat_e4m3((q1, q3), dim), torch.cat((s1, s3), dim)

    if not _reusing((w1, w3)):
        return quantize(transposed)
    q, s = _kept_blocks((w1, w3), lambda: quantize(False))
    return transposed_blocks(q, s) if transposed else (q, s)


def _aligned(*dims: int) -> bool:
    return all(d % 16 == 0 for d in dims)


# ---------------------------------------------------------------------------------- rowwise, dense
def fp8_mm_t(a: Tensor, b: Tensor, emulate: bool = False, out_dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """a [M, K] @ b[N, K].T with both quantized row-wise along K (float32 accumulation).

    emulate=True computes the same quantized product with dequantized float32 operands (the
    reference path). Shapes the FP8 kernel cannot take (a dim not a multiple of 16) fall back to
    a plain product in out_dtype.
    """
    (_m, k), n = a.shape, b.shape[0]
    if not emulate and not _aligned(k, n):
        _warn_once("rowwise-unaligned", f"training.fp8_recipe rowwise: products with dimensions that are not "
                                        f"multiples of 16 (here K={k}, N={n}) run in {out_dtype}")
        return (a.to(out_dtype) @ b.to(out_dtype).t())
    aq, sa = _q_rows(a)
    bq, sb = _q_rows(b)
    if emulate:
        return ((aq.float() * sa) @ (bq.float() * sb).t()).to(out_dtype)
    return _rowwise_mm_t(aq, sa, bq, sb).to(out_dtype)


# The kernel calls below are plain functions: they run inside the FP8 custom ops (`fp8_linear`,
# `fp8_grouped_linear` and their backwards), which torch.compile keeps opaque, so a compiled model
# runs exactly the kernels and operand layouts of the eager path, with one operator dispatch per
# layer call and none per inner product.
def _rowwise_mm_t(aq: Tensor, sa: Tensor, bq: Tensor, sb: Tensor) -> Tensor:
    """aq [M, K] e4m3 with scales sa [M, 1]; bq [N, K] e4m3 with sb [N, 1] -> bf16 [M, N]."""
    return torch._scaled_mm(aq.contiguous(), bq.contiguous().t(), scale_a=sa.reshape(-1, 1).contiguous(),
                            scale_b=sb.reshape(1, -1).contiguous(), out_dtype=torch.bfloat16)


def _rowwise_grouped_mm_t(xq: Tensor, sx: Tensor, wq: Tensor, sw: Tensor, offsets: Tensor) -> Tensor:
    """xq [M, K] e4m3 rows sorted by group, sx [M, 1]; wq [E, N, K] e4m3, sw [E, N, 1] -> bf16 [M, N]."""
    return torch._scaled_grouped_mm(xq.contiguous(), wq.contiguous().transpose(-2, -1), sx.reshape(-1).contiguous(),
                                    sw.reshape(sw.shape[0], -1).contiguous(), offs=offsets, out_dtype=torch.bfloat16)


# ---------------------------------------------------------------------------------- blockwise, dense
def _scaled_mm_v2() -> Any:
    """`torch.nn.functional.scaled_mm` (torch >= 2.10): block scaling named per operand."""
    return getattr(F, "scaled_mm", None)


def cublas_block_scales(sa: Tensor, sb: Tensor, b_blocks: bool) -> tuple[Tensor, Tensor]:
    """The scale tensors cuBLAS block scaling takes through `torch.nn.functional.scaled_mm(aq,
    bq.t(), ...)` for 1x128 scales sa [M, Kt] of aq and 128x128 [N/128, Kt] (b_blocks) or 1x128
    [N, Kt] scales sb of bq (torch's rules for `ScalingType.BlockWise1x128` / `BlockWise128x128`):
    scale_a (M, Kt) with strides (1, M); 1x128 scale_b (N, Kt) with strides (1, N); 128x128
    scale_b (L4, N/128) with strides (1, L4), where L4 is Kt rounded up to a multiple of 4 (the
    padding scales are zero and meet no data)."""
    scale_a = sa.t().contiguous().t()  # no copy when the quantizer wrote column-major scales (Triton)
    if not b_blocks:
        return scale_a, sb.t().contiguous().t()
    nt, kt = sb.shape
    if kt % 4 == 0:
        return scale_a, sb.contiguous().t()
    buf = sb.new_zeros(nt, -(-kt // 4) * 4)
    buf[:, :kt] = sb
    return scale_a, buf.t()


def _pad_k_to_512(aq: Tensor, sa: Tensor, bq: Tensor, sb: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Zero-pad the contraction dimension of both quantized operands (and their scales) to a
    multiple of 512, so that the scale rows are 16-byte aligned for torch's `_scaled_mm`."""
    if aq.shape[1] % 512 == 0:
        return aq, sa, bq, sb
    pad = lambda t, m: _pad_to(t.view(torch.uint8), 1, m).view(t.dtype)  # noqa: E731
    return pad(aq, 512), _pad_to(sa, 1, 4), pad(bq, 512), _pad_to(sb, 1, 4)


def _blockwise_mm_t_impl(aq: Tensor, sa: Tensor, bq: Tensor, sb: Tensor, b_blocks: bool) -> Tensor:
    """Runs inside the opaque FP8 ops (`fp8_linear` and its backward), as a plain call: one operator
    dispatch per FP8 layer call, none per inner product. aq [M, Kp] e4m3 with 1x128 scales sa [M, Kt];
    bq [N, Kp] e4m3 with 128x128 scales [N/128, Kt] (b_blocks) or 1x128 scales [N, Kt] -> bf16 [M, N] by cuBLAS block scaling (Hopper):
    `torch.nn.functional.scaled_mm` with the recipe of each operand named, or on torch without it
    `torch._scaled_mm` with K padded to a multiple of 512 (its shape-inferred recipe needs aligned
    scale rows)."""
    m = aq.shape[0]
    if m % 16:  # rows (and the column-major scale_a stride) padded to 16: cuBLAS alignment
        aq, sa = _pad_to(aq.view(torch.uint8), 0, 16).view(aq.dtype), _pad_to(sa, 0, 16)
    v2 = _scaled_mm_v2()
    try:
        if v2 is not None:
            kind = F.ScalingType
            scale_a, scale_b = cublas_block_scales(sa, sb, b_blocks)
            out = v2(aq.contiguous(), bq.contiguous().t(), scale_a, kind.BlockWise1x128, scale_b,
                     kind.BlockWise128x128 if b_blocks else kind.BlockWise1x128, output_dtype=torch.bfloat16)
        else:
            aq, sa, bq, sb = _pad_k_to_512(aq, sa, bq, sb)
            scale_a, scale_b = cublas_block_scales(sa, sb, b_blocks)
            scale_b = scale_b if b_blocks else scale_b.t().contiguous()  # (Kt, N) row-major here
            out = torch._scaled_mm(aq.contiguous(), bq.contiguous().t(), scale_a=scale_a, scale_b=scale_b,
                                   out_dtype=torch.bfloat16)
        return out[:m]
    except RuntimeError as exc:  # no silent fallback: say which setting to change
        reason = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise ConfigError(f"training.fp8_recipe: blockwise: this torch/cuBLAS refused the block-scaled product "
                          f"[{m} x {aq.shape[1]}] @ [{aq.shape[1]} x {bq.shape[0]}] ({reason}); use "
                          "training.fp8_recipe: rowwise") from exc


def blockwise_mm_t(aq: Tensor, sa: Tensor, bq: Tensor, sb: Tensor, b_blocks: bool, emulate: bool) -> Tensor:
    """Quantized aq [M, Kp] (1x128 scales) times quantized bq [N, Kp] (128x128 blocks if b_blocks,
    else 1x128 tiles), transposed -> [M, N]: the FP8 kernel (bf16 out) or, emulate=True, the float32
    product of the dequantized operands (the reference path)."""
    if emulate:
        b = dequantize_128x128(bq, sb) if b_blocks else dequantize_1x128(bq, sb)
        return dequantize_1x128(aq, sa) @ b.t()
    return _blockwise_mm_t_impl(aq, sa, bq, sb, b_blocks)


def blockwise_wgrad(gq: Tensor, sg: Tensor, x: Tensor, emulate: bool) -> Tensor:
    """g.T @ x [Np, Kp] for x [T, K] and the output gradient g [T, N] given as its 1x128 tiles along
    the tokens (gq [Np, Tp], sg: `quantize_1x128_t(g)`); x is tiled the same way here."""
    xq, sx = _q_1x128_t(x)
    return blockwise_mm_t(gq, sg, xq, sx, False, emulate)


def _linear_placements(x: Any, w: Any, out_ndim: int) -> tuple[list, list, list]:
    """For y = x @ w.T with a DTensor weight w [N, K] and input x (DTensor or local), computed on
    the local shards: the placements of y, and those that the local gradients of x and w have
    (Partial where a rank's local product holds only part of a sum)."""
    from torch.distributed.tensor import Partial, Replicate, Shard

    x_places = x.placements if is_dtensor(x) else [Replicate()] * len(w.placements)
    out, grad_x, grad_w = [], [], []
    for wp, xp in zip(w.placements, x_places, strict=True):
        tokens_sharded = xp.is_shard() and not xp.is_shard(x.ndim - 1)
        if wp.is_shard(0):
            out.append(Shard(out_ndim - 1))
        elif wp.is_shard(1) or xp.is_shard(x.ndim - 1):
            out.append(Partial())
        else:
            out.append(xp)
        grad_x.append(Partial() if wp.is_shard(0) and xp.is_replicate() else xp)
        grad_w.append(Partial() if wp.is_replicate() and tokens_sharded else wp)
    return out, grad_x, grad_w


class Float8Linear(nn.Linear):
    """nn.Linear whose products run in FP8 (`fp8_recipe`: blockwise or rowwise); same parameters
    and state dict. `fp8_emulate=None` uses the kernels on CUDA inputs and the float32 emulation
    elsewhere; a DTensor weight (tensor parallelism) is multiplied shard by shard."""

    fp8_enabled: bool = True
    fp8_emulate: Optional[bool] = None
    fp8_recipe: str = "blockwise"

    def forward(self, x: Tensor) -> Tensor:
        if not self.fp8_enabled:
            return F.linear(x, self.weight, self.bias)
        w = self.weight
        if is_dtensor(w):
            from torch.distributed.tensor import DTensor

            out, grad_x, grad_w = _linear_placements(x, w, x.dim())
            x_local = x.to_local(grad_placements=grad_x) if is_dtensor(x) else x
            y = self._product(x_local, w.to_local(grad_placements=grad_w))
            y = DTensor.from_local(y, w.device_mesh, out, run_check=False)
        else:
            y = self._product(x, w)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def _product(self, x: Tensor, w: Tensor) -> Tensor:
        shape = x.shape
        emulate = self.fp8_emulate if self.fp8_emulate is not None else not x.is_cuda
        y = fp8_linear(x.reshape(-1, shape[-1]), w, self.fp8_recipe, emulate, compute_dtype(x))
        return y.view(*shape[:-1], y.shape[-1])


# ---------------------------------------------------------------------------------- rowwise, experts
def _grouped_mm() -> Any:
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def fp8_grouped_mm_t(x: Tensor, w: Tensor, offsets: Tensor, emulate: bool = False) -> Tensor:
    """Rows of x [M, K] sorted by group, group e (rows offsets[e-1]:offsets[e]) times w[e].T
    (w [E, N, K]) -> [M, N] bf16; both operands quantized row-wise along K."""
    xq, sx = _q_rows(x)
    wq, sw = _q_rows(w)
    if emulate:
        out = x.new_zeros(x.shape[0], w.shape[1], dtype=torch.bfloat16)
        xd, wd = xq.float() * sx, wq.float() * sw
        start = 0
        for e, end in enumerate(offsets.tolist()):
            if end > start:
                out[start:end] = (xd[start:end] @ wd[e].t()).to(out.dtype)
            start = end
        return out
    return _rowwise_grouped_mm_t(xq, sx, wq, sw, offsets)


def _grouped_weight_grad_kernel(g: Tensor, x: Tensor, offsets: Tensor, num_groups: int) -> Tensor:
    """Inside the opaque FP8 ops, so the layouts below are the ones the kernel gets: with g [M, N]
    row-major, g.t() is column-major and no group size needs 16-byte alignment along the tokens."""
    return _grouped_mm()(g.contiguous().t(), x.contiguous(), offs=offsets)


def grouped_weight_grad(g: Tensor, x: Tensor, offsets: Tensor, num_groups: int, emulate: bool) -> Tensor:
    """Per-group g_e.T @ x_e -> [E, N, K] in bf16 (the weight gradient of a grouped product)."""
    if emulate:
        out = g.new_zeros(num_groups, g.shape[1], x.shape[1], dtype=torch.float32)
        start = 0
        for e, end in enumerate(offsets.tolist()):
            if end > start:
                out[e] = g[start:end].float().t() @ x[start:end].float()
            start = end
        return out
    return _grouped_weight_grad_kernel(g, x, offsets, num_groups)


# ---------------------------------------------------------------------------------- blockwise, experts
def _group_bounds(offsets: Tensor) -> list[tuple[int, int, int]]:
    bounds, start = [], 0
    for e, end in enumerate(offsets.tolist()):
        bounds.append((e, start, end))
        start = end
    return bounds


def _grouped_backend() -> str:
    """'triton' (the grouped kernels) or 'loop' (one `torch._scaled_mm` per expert; warns once)."""
    choice = os.environ.get("LIT_DEEPSEEK_FP8_GROUPED", "triton")
    if choice == "triton":
        try:
            import triton  # noqa: F401
            return "triton"
        except ImportError:
            choice = "loop"
    _warn_once("grouped-loop", "training.fp8_recipe blockwise: routed experts run one torch._scaled_mm per expert "
                               "(Triton unavailable or LIT_DEEPSEEK_FP8_GROUPED=loop); slower than the grouped kernel")
    return "loop"


def _blockwise_grouped_mm_t_impl(aq: Tensor, sa: Tensor, bq: Tensor, sb: Tensor, offsets: Tensor) -> Tensor:
    """Rows of aq [M, Kp] (1x128 scales) sorted by group, times bq[e] [Np, Kp] (128x128 scales) -> bf16 [M, Np]."""
    if _grouped_backend() == "triton":
        from lit_deepseek.kernels.fp8_triton import grouped_mm_t

        return grouped_mm_t(aq, sa, bq, sb, offsets)
    out = aq.new_zeros(aq.shape[0], bq.shape[1], dtype=torch.bfloat16)
    for e, start, end in _group_bounds(offsets):
        if end > start:
            out[start:end] = _blockwise_mm_t_impl(aq[start:end], sa[start:end], bq[e], sb[e], True)
    return out


def _blockwise_grouped_wgrad_impl(gq: Tensor, sg: Tensor, xq: Tensor, sx: Tensor, offsets: Tensor) -> Tensor:
    """gq [Np, Mp], xq [Kp, Mp] (1x128 scales along the tokens) -> float32 [E, Np, Kp], group e
    summing over its own tokens."""
    if _grouped_backend() == "triton":
        from lit_deepseek.kernels.fp8_triton import grouped_wgrad

        return grouped_wgrad(gq, sg, xq, sx, offsets)
    out = gq.new_zeros(offsets.numel(), gq.shape[0], xq.shape[0], dtype=torch.float32)
    for e, start, end in _group_bounds(offsets):
        if end > start:
            t0, t1 = start // BLOCK * BLOCK, -(-end // BLOCK) * BLOCK
            a, b = gq[:, t0:t1].clone(), xq[:, t0:t1].clone()
            for q in (a, b):  # zero bits are +0.0 in e4m3: drop the neighbouring groups' tokens
                q.view(torch.uint8)[:, :start - t0] = 0
                q.view(torch.uint8)[:, end - t0:] = 0
            out[e] = _blockwise_mm_t_impl(a, sg[:, t0 // BLOCK:t1 // BLOCK], b, sx[:, t0 // BLOCK:t1 // BLOCK], False)
    return out


def blockwise_grouped_mm_t(aq: Tensor, sa: Tensor, bq: Tensor, sb: Tensor, offsets: Tensor, emulate: bool) -> Tensor:
    """Grouped `blockwise_mm_t`: rows offsets[e-1]:offsets[e] of aq times bq[e].T -> [M, Np]."""
    if not emulate:
        return _blockwise_grouped_mm_t_impl(aq, sa, bq, sb, offsets)
    a, b = dequantize_1x128(aq, sa), dequantize_128x128(bq, sb)
    out = a.new_zeros(a.shape[0], b.shape[1])
    for e, start, end in _group_bounds(offsets):
        if end > start:
            out[start:end] = a[start:end] @ b[e].t()
    return out


def blockwise_grouped_wgrad(gq: Tensor, sg: Tensor, x: Tensor, offsets: Tensor, emulate: bool) -> Tensor:
    """Per group e: g_e.T @ x_e -> [E, Np, Kp], both operands in 1x128 tiles along the tokens (the
    output gradient g given tiled: gq, sg = `quantize_1x128_t(g)`)."""
    return _blockwise_grouped_wgrad_q(gq, sg, *_q_1x128_t(x), offsets, emulate)


def _blockwise_grouped_wgrad_q(gq: Tensor, sg: Tensor, xq: Tensor, sx: Tensor, offsets: Tensor,
                               emulate: bool) -> Tensor:
    """`blockwise_grouped_wgrad` with x given tiled too (xq, sx = `quantize_1x128_t(x)`)."""
    if not emulate:
        return _blockwise_grouped_wgrad_impl(gq, sg, xq, sx, offsets)
    gd, xd = dequantize_1x128(gq, sg), dequantize_1x128(xq, sx)
    out = gd.new_zeros(offsets.numel(), gd.shape[0], xd.shape[0])
    for e, start, end in _group_bounds(offsets):
        if end > start:
            out[e] = gd[:, start:end] @ xd[:, start:end].t()
    return out


# ---------------------------------------------------------------------------------- differentiable products
# Each FP8 product is one custom op whose backward is another (`register_autograd`): torch.compile
# sees two opaque calls and traces nothing inside them, so a compiled model runs the very kernels,
# layouts and quantization of the eager path. (An autograd.Function form of these products compiled,
# on CUDA, to a backward that received an all-zero output gradient: exact forward, wrong dx and dw.)
def _fresh(t: Tensor, cols: int, dtype: torch.dtype) -> Tensor:
    """The first `cols` columns of t in dtype, as a contiguous tensor."""
    if t.shape[-1] != cols:
        t = t[..., :cols]
    if t.dtype != dtype:
        t = t.to(dtype)
    return t if t.is_contiguous() else t.contiguous()


@torch.library.custom_op("lit_deepseek::fp8_linear", mutates_args=())
def _fp8_linear_op(x: Tensor, w: Tensor, recipe: str, emulate: bool, out_dtype: torch.dtype) -> Tensor:
    """x [M, K] @ w [N, K].T -> [M, N] in out_dtype, the product in FP8 by `recipe`."""
    if recipe == "blockwise":
        wq, sw = weight_blocks(w)
        xq, sx = _q_1x128(x)
        return _fresh(blockwise_mm_t(xq, sx, wq, sw, True, emulate), w.shape[0], out_dtype)
    return _fresh(fp8_mm_t(x, w, emulate, out_dtype), w.shape[0], out_dtype)


@_fp8_linear_op.register_fake
def _(x: Tensor, w: Tensor, recipe: str, emulate: bool, out_dtype: torch.dtype) -> Tensor:
    return x.new_empty(x.shape[0], w.shape[0], dtype=out_dtype)


@torch.library.custom_op("lit_deepseek::fp8_linear_backward", mutates_args=())
def _fp8_linear_backward_op(g: Tensor, x: Tensor, w: Tensor, recipe: str, emulate: bool) -> tuple[Tensor, Tensor]:
    """(dx, dw) of `fp8_linear` for the output gradient g [M, N], both products in FP8."""
    (n, k), g = w.shape, g.contiguous()
    if recipe == "blockwise":
        # the forward's blocks again, in the transposed layout: the 128x128 blocks of w.T are those
        # of w, transposed, with the same scales (the quantizer reads w in its memory order)
        wq_t, sw_t = weight_blocks(w, transposed=True)
        gq, sg, gq_t, sg_t = _q_1x128_dual(g)  # g read once, tiled for both products
        dx = blockwise_mm_t(gq, sg, wq_t, sw_t, True, emulate)
        dw = blockwise_wgrad(gq_t, sg_t, x, emulate)[:n]
    else:
        # transposed operands go to the quantizers as views (the Triton one copies them to unit-stride rows)
        dx = fp8_mm_t(g, w.t(), emulate)
        dw = fp8_mm_t(g.t(), x.t(), emulate)
    return _fresh(dx, k, x.dtype), _fresh(dw, k, w.dtype)


@_fp8_linear_backward_op.register_fake
def _(g: Tensor, x: Tensor, w: Tensor, recipe: str, emulate: bool) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(w, memory_format=torch.contiguous_format)


def _save_inputs(ctx: Any, inputs: tuple, output: Tensor) -> None:
    ctx.save_for_backward(*(t for t in inputs if isinstance(t, Tensor)))
    ctx.args = tuple(a for a in inputs if not isinstance(a, Tensor))


def _fp8_linear_backward(ctx: Any, g: Tensor) -> tuple:
    x, w = ctx.saved_tensors
    recipe, emulate, _ = ctx.args
    dx, dw = _fp8_linear_backward_op(g, x, w, recipe, emulate)
    return dx, dw, None, None, None


_fp8_linear_op.register_autograd(_fp8_linear_backward, setup_context=_save_inputs)


def fp8_linear(x: Tensor, w: Tensor, recipe: str = "blockwise", emulate: bool = False,
               out_dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Differentiable x [M, K] @ w [N, K].T with the three products of forward and backward in FP8
    (`recipe` blockwise or rowwise; emulate=True: the float32 reference of the same quantization)."""
    return _fp8_linear_op(x, w, recipe, emulate, out_dtype)


@torch.library.custom_op("lit_deepseek::fp8_grouped_linear", mutates_args=())
def _fp8_grouped_linear_op(x: Tensor, w: Tensor, offsets: Tensor, recipe: str, emulate: bool,
                           bf16_wgrad: bool) -> Tensor:
    """Rows of x [M, K] sorted by group, group e times w[e].T (w [E, N, K]) -> bf16 [M, N] in FP8."""
    if recipe == "blockwise":
        wq, sw = weight_blocks(w)
        xq, sx = _q_1x128(x)
        return _fresh(blockwise_grouped_mm_t(xq, sx, wq, sw, offsets, emulate), w.shape[1], torch.bfloat16)
    return _fresh(fp8_grouped_mm_t(x, w, offsets, emulate), w.shape[1], torch.bfloat16)


@_fp8_grouped_linear_op.register_fake
def _(x: Tensor, w: Tensor, offsets: Tensor, recipe: str, emulate: bool, bf16_wgrad: bool) -> Tensor:
    return x.new_empty(x.shape[0], w.shape[1], dtype=torch.bfloat16)


@torch.library.custom_op("lit_deepseek::fp8_grouped_linear_backward", mutates_args=())
def _fp8_grouped_linear_backward_op(g: Tensor, x: Tensor, w: Tensor, offsets: Tensor, recipe: str,
                                    emulate: bool, bf16_wgrad: bool) -> tuple[Tensor, Tensor]:
    """(dx, dw) of `fp8_grouped_linear`; the row-wise recipe (and the blockwise one with bf16_wgrad)
    keeps the weight gradient in bf16."""
    (e, n, k), g = w.shape, g.contiguous()
    bf16_wgrad = bf16_wgrad or recipe != "blockwise"
    if recipe == "blockwise":
        wt, swt = weight_blocks(w, transposed=True)  # as the dense backward: blocks of w[e].T directly
        if bf16_wgrad:
            dx = blockwise_grouped_mm_t(*_q_1x128(g), wt, swt, offsets, emulate)
        else:
            gq, sg, gq_t, sg_t = _q_1x128_dual(g)
            dx = blockwise_grouped_mm_t(gq, sg, wt, swt, offsets, emulate)
            dw = blockwise_grouped_wgrad(gq_t, sg_t, x, offsets, emulate)[:, :n]
    else:
        dx = fp8_grouped_mm_t(g, w.transpose(-2, -1).contiguous(), offsets, emulate)
    if bf16_wgrad:
        dw = grouped_weight_grad(g.bfloat16(), x.bfloat16(), offsets, e, emulate)
    return _fresh(dx, k, x.dtype), _fresh(dw, k, w.dtype)


@_fp8_grouped_linear_backward_op.register_fake
def _(g: Tensor, x: Tensor, w: Tensor, offsets: Tensor, recipe: str, emulate: bool,
      bf16_wgrad: bool) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(w, memory_format=torch.contiguous_format)


def _fp8_grouped_linear_backward(ctx: Any, g: Tensor) -> tuple:
    x, w, offsets = ctx.saved_tensors
    recipe, emulate, bf16_wgrad = ctx.args
    dx, dw = _fp8_grouped_linear_backward_op(g, x, w, offsets, recipe, emulate, bf16_wgrad)
    return dx, dw, None, None, None, None


_fp8_grouped_linear_op.register_autograd(_fp8_grouped_linear_backward, setup_context=_save_inputs)


def fp8_grouped_linear(x: Tensor, w: Tensor, offsets: Tensor, emulate: bool = False,
                       recipe: str = "rowwise", bf16_wgrad: bool = False) -> Tensor:
    """Differentiable grouped x_e @ w[e].T (w [E, N, K], offsets the cumulative group ends) -> bf16,
    in FP8 by `recipe` (rowwise: forward and input gradient; blockwise: all three products, or the
    first two with bf16_wgrad, the weight gradient then a bf16 grouped GEMM of the unquantized
    operands)."""
    return _fp8_grouped_linear_op(x, w, offsets, recipe, emulate, bf16_wgrad)


def _cat_e4m3(parts: Sequence[Tensor], dim: int) -> Tensor:
    return torch.cat([p.view(torch.uint8) for p in parts], dim).view(torch.float8_e4m3fn)


# SwiGLU's gate and up products share their input: under the blockwise recipe they run as one
# product over both weights' 128x128 blocks side by side, so x is quantized once per pass (along the
# channels forward, along the tokens backward), the output gradient once, and each pass makes one
# product and one operator dispatch fewer. Each weight is quantized on its own and the intermediate
# size N is a multiple of 128 (no tile or block straddles the two weights), so the quantized operands
# are exactly those of two separate products. The helpers below serve the dense layers (w [N, K],
# cuBLAS) and the routed experts (w [E, N, K], the grouped kernels) alike.
def _gate_up_forward(x: Tensor, w1: Tensor, w3: Tensor, product: Any) -> Tensor:
    """[M, 2N]: x @ w1.T in the first N columns, x @ w3.T in the last N; product(xq, sx, wq, sw)."""
    return product(*_q_1x128(x), *_gate_up_blocks(w1, w3, transposed=False))


def _gate_up_backward(g: Tensor, x: Tensor, w1: Tensor, w3: Tensor, product: Any, wgrad: Any,
                      bf16_wgrad: Optional[Any] = None) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dw1, dw3) for the output gradient g [M, 2N]: one input-gradient product contracting over
    both weights (2N), one weight-gradient product wgrad(gq, sg, xq, sx) per weight; or, given
    bf16_wgrad(g, x) -> [..., N, K], one unquantized product per weight's half of g."""
    n, k = w1.shape[-2:]
    g = g.contiguous()
    gq, sg, *tiled_t = _q_1x128_dual(g) if bf16_wgrad is None else _q_1x128(g)
    dx = product(gq, sg, *_gate_up_blocks(w1, w3, transposed=True))
    if bf16_wgrad is None:
        (gq_t, sg_t), (xq_t, sx_t) = tiled_t, _q_1x128_t(x)
        dw1, dw3 = (wgrad(gq_t[rows], sg_t[rows], xq_t, sx_t) for rows in (slice(0, n), slice(n, 2 * n)))
    else:  # one product per weight: each gradient is written contiguous (slicing [..., 2N, K] would copy both)
        gb, xb = g.bfloat16(), x.bfloat16()
        dw1, dw3 = (bf16_wgrad(gb[..., cols], xb) for cols in (slice(0, n), slice(n, 2 * n)))
    return _fresh(dx, k, x.dtype), _fresh(dw1, k, w1.dtype), _fresh(dw3, k, w3.dtype)


def gate_up_fusable(w1: Tensor, w3: Tensor) -> bool:
    """Whether gate and up weights (w [N, K] or [E, N, K]) can run as one blockwise product: the same
    shape, with the intermediate size N a multiple of 128."""
    return w3.shape == w1.shape and w1.shape[-2] % BLOCK == 0


def _check_gate_up(w1: Tensor, w3: Tensor) -> None:
    if not gate_up_fusable(w1, w3):
        raise ValueError(f"fp8 gate/up: w1 {tuple(w1.shape)} and w3 {tuple(w3.shape)} must have the same shape, "
                         f"with the intermediate size a multiple of {BLOCK}")


def _fresh_like(*ts: Tensor) -> tuple[Tensor, ...]:
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in ts)


@torch.library.custom_op("lit_deepseek::fp8_gate_up", mutates_args=())
def _fp8_gate_up_op(x: Tensor, w1: Tensor, w3: Tensor, emulate: bool, out_dtype: torch.dtype) -> Tensor:
    """x [M, K] times w1 [N, K].T and w3 [N, K].T -> [M, 2N] in out_dtype (blockwise FP8)."""
    out = _gate_up_forward(x, w1, w3, lambda a, sa, b, sb: blockwise_mm_t(a, sa, b, sb, True, emulate))
    return _fresh(out, 2 * w1.shape[0], out_dtype)


@_fp8_gate_up_op.register_fake
def _(x: Tensor, w1: Tensor, w3: Tensor, emulate: bool, out_dtype: torch.dtype) -> Tensor:
    return x.new_empty(x.shape[0], 2 * w1.shape[0], dtype=out_dtype)


@torch.library.custom_op("lit_deepseek::fp8_gate_up_backward", mutates_args=())
def _fp8_gate_up_backward_op(g: Tensor, x: Tensor, w1: Tensor, w3: Tensor, emulate: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _gate_up_backward(g, x, w1, w3, lambda a, sa, b, sb: blockwise_mm_t(a, sa, b, sb, True, emulate),
                             lambda a, sa, b, sb: blockwise_mm_t(a, sa, b, sb, False, emulate))


@_fp8_gate_up_backward_op.register_fake
def _(g: Tensor, x: Tensor, w1: Tensor, w3: Tensor, emulate: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _fresh_like(x, w1, w3)


def _fp8_gate_up_backward(ctx: Any, g: Tensor) -> tuple:
    x, w1, w3 = ctx.saved_tensors
    emulate, _ = ctx.args
    return (*_fp8_gate_up_backward_op(g, x, w1, w3, emulate), None, None)


_fp8_gate_up_op.register_autograd(_fp8_gate_up_backward, setup_context=_save_inputs)


def fp8_gate_up(x: Tensor, w1: Tensor, w3: Tensor, emulate: bool = False,
                out_dtype: torch.dtype = torch.bfloat16) -> tuple[Tensor, Tensor]:
    """Differentiable (x @ w1.T, x @ w3.T) for x [M, K] and w1, w3 [N, K] (N a multiple of 128), in
    block-scaled FP8 as one product; the values of two blockwise `fp8_linear` calls, up to float32
    summation order in the input gradient."""
    _check_gate_up(w1, w3)
    return _fp8_gate_up_op(x, w1, w3, emulate, out_dtype).split(w1.shape[0], dim=-1)


@torch.library.custom_op("lit_deepseek::fp8_grouped_gate_up", mutates_args=())
def _fp8_grouped_gate_up_op(x: Tensor, w1: Tensor, w3: Tensor, offsets: Tensor, emulate: bool,
                            bf16_wgrad: bool) -> Tensor:
    """Rows of x [M, K] sorted by group, times w1[e].T and w3[e].T (each [E, N, K]) -> bf16 [M, 2N]."""
    out = _gate_up_forward(x, w1, w3, lambda a, sa, b, sb: blockwise_grouped_mm_t(a, sa, b, sb, offsets, emulate))
    return _fresh(out, 2 * w1.shape[1], torch.bfloat16)


@_fp8_grouped_gate_up_op.register_fake
def _(x: Tensor, w1: Tensor, w3: Tensor, offsets: Tensor, emulate: bool, bf16_wgrad: bool) -> Tensor:
    return x.new_empty(x.shape[0], 2 * w1.shape[1], dtype=torch.bfloat16)


@torch.library.custom_op("lit_deepseek::fp8_grouped_gate_up_backward", mutates_args=())
def _fp8_grouped_gate_up_backward_op(g: Tensor, x: Tensor, w1: Tensor, w3: Tensor, offsets: Tensor,
                                     emulate: bool, bf16_wgrad: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _gate_up_backward(
        g, x, w1, w3, lambda a, sa, b, sb: blockwise_grouped_mm_t(a, sa, b, sb, offsets, emulate),
        lambda a, sa, b, sb: _blockwise_grouped_wgrad_q(a, sa, b, sb, offsets, emulate),
        (lambda gb, xb: grouped_weight_grad(gb, xb, offsets, w1.shape[0], emulate)) if bf16_wgrad else None)


@_fp8_grouped_gate_up_backward_op.register_fake
def _(g: Tensor, x: Tensor, w1: Tensor, w3: Tensor, offsets: Tensor, emulate: bool,
      bf16_wgrad: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _fresh_like(x, w1, w3)


def _fp8_grouped_gate_up_backward(ctx: Any, g: Tensor) -> tuple:
    x, w1, w3, offsets = ctx.saved_tensors
    emulate, bf16_wgrad = ctx.args
    return (*_fp8_grouped_gate_up_backward_op(g, x, w1, w3, offsets, emulate, bf16_wgrad), None, None, None)


_fp8_grouped_gate_up_op.register_autograd(_fp8_grouped_gate_up_backward, setup_context=_save_inputs)


def fp8_grouped_gate_up(x: Tensor, w1: Tensor, w3: Tensor, offsets: Tensor, emulate: bool = False,
                        bf16_wgrad: bool = False) -> tuple[Tensor, Tensor]:
    """Differentiable (gate, up) = (x_e @ w1[e].T, x_e @ w3[e].T) of the routed experts (w1, w3 [E, N,
    K], N a multiple of 128), bf16, in block-scaled FP8 as one grouped product; the values of two
    blockwise `fp8_grouped_linear` calls (same bf16_wgrad), up to float32 summation order in the
    input gradient (and, with bf16_wgrad, bf16 rounding of the weight gradient)."""
    _check_gate_up(w1, w3)
    return _fp8_grouped_gate_up_op(x, w1, w3, offsets, emulate, bf16_wgrad).split(w1.shape[1], dim=-1)


def fp8_blockwise_grouped_linear(x: Tensor, w: Tensor, offsets: Tensor, emulate: bool = False) -> Tensor:
    """Differentiable grouped x_e @ w[e].T (w [E, N, K]) with all three products in block-scaled FP8."""
    return fp8_grouped_linear(x, w, offsets, emulate, recipe="blockwise")


class Float8GroupedExperts(GroupedExperts):
    """Routed SwiGLU experts with FP8 grouped products; same parameters as GroupedExperts."""

    fp8_enabled: bool = True
    fp8_emulate: Optional[bool] = None
    fp8_recipe: str = "blockwise"
    fp8_wgrad: str = "bf16"  # the weight-gradient products under the blockwise recipe: "bf16" or "fp8"

    def forward(self, x: Tensor, counts: Tensor, use_grouped_mm: Optional[bool] = None) -> Tensor:
        if not self.fp8_enabled:
            return super().forward(x, counts, use_grouped_mm)
        offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
        e = self.fp8_emulate if self.fp8_emulate is not None else not x.is_cuda
        x = x.to(compute_dtype(x))  # as GroupedExperts: the autocast dtype under mixed precision
        r, bw = self.fp8_recipe, self.fp8_wgrad == "bf16"
        if r == "blockwise" and gate_up_fusable(self.w1, self.w3):  # gate and up as one product
            gate, up = fp8_grouped_gate_up(x, self.w1, self.w3, offsets, e, bw)
        else:
            gate, up = (fp8_grouped_linear(x, self.w1, offsets, e, r, bw),
                        fp8_grouped_linear(x, self.w3, offsets, e, r, bw))
        return fp8_grouped_linear(swiglu(gate, up), self.w2, offsets, e, r, bw).to(x.dtype)


class Float8SwiGLU(SwiGLU):
    """Dense SwiGLU (the dense layers' FFN, the shared experts) whose gate and up projections run as
    one FP8 product (`fp8_gate_up`) when both are blockwise `Float8Linear`s with plain (not tensor-
    parallel) weights, no bias and an intermediate size that is a multiple of 128; otherwise, as
    SwiGLU, one product per projection. Same parameters and state dict as SwiGLU."""

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_proj, self.up_proj
        fused = (all(isinstance(m, Float8Linear) and m.fp8_enabled and m.fp8_recipe == "blockwise"
                     and m.bias is None and not is_dtensor(m.weight) for m in (gate, up))
                 and gate.fp8_emulate == up.fp8_emulate and not is_dtensor(x)
                 and gate_up_fusable(gate.weight, up.weight))
        if not fused:
            return super().forward(x)
        emulate = gate.fp8_emulate if gate.fp8_emulate is not None else not x.is_cuda
        g, u = fp8_gate_up(x.reshape(-1, x.shape[-1]), gate.weight, up.weight, emulate, compute_dtype(x))
        return self.down_proj(swiglu(g, u).view(*x.shape[:-1], -1))


def float8_experts_class() -> type:
    """The FP8 subclass of `GroupedExperts` that `convert_to_fp8` switches experts to."""
    return Float8GroupedExperts


# ---------------------------------------------------------------------------------- conversion
def check_fp8_supported(recipe: str = "rowwise") -> None:
    """Raise ConfigError unless a CUDA GPU runs `recipe`: compute capability >= 8.9 (rowwise) or
    >= 9.0 (blockwise, cuBLAS block scaling)."""
    need = (9, 0) if recipe == "blockwise" else (8, 9)
    if not torch.cuda.is_available():
        raise ConfigError(f"training.use_fp8: FP8 training needs a CUDA GPU with compute capability >= "
                          f"{need[0]}.{need[1]}; none is available")
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < need:
        raise ConfigError(f"training.use_fp8: the {recipe} FP8 recipe needs compute capability >= {need[0]}.{need[1]}, "
                          f"this GPU has {major}.{minor}" + (" (training.fp8_recipe: rowwise runs on >= 8.9)"
                                                              if recipe == "blockwise" and (major, minor) >= (8, 9) else ""))


def fp8_excluded(name: str, exclude: Sequence[str]) -> bool:
    """Whether module `name` (dotted path) or one of its parents matches a pattern of `exclude`; a
    pattern matches a full path or its trailing components (`head`, `attn.o_proj`, `layers.0.*`)."""
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        prefix = ".".join(parts[:i])
        for pat in exclude:
            if fnmatch.fnmatchcase(prefix, pat) or fnmatch.fnmatchcase(prefix, "*." + pat):
                return True
    return False


#: why training.fp8_expert_wgrad: fp8 warns on CUDA (benchmarks/RESULTS.md, 2026-12-07, eleventh session)
FP8_EXPERT_WGRAD_WARNING = (
    "training.fp8_expert_wgrad: fp8 runs the routed experts' weight gradients through the FP8 Triton path, which "
    "was 6.5x slower than torch's bf16 grouped GEMM at the small config's shapes on an H100; bf16 (the default) is "
    "recommended")


def convert_to_fp8(module: nn.Module, recipe: str = "rowwise", exclude: Sequence[str] = DEFAULT_EXCLUDE,
                   emulate: Optional[bool] = None, experts: bool = True,
                   expert_wgrad: str = "bf16") -> dict[str, int]:
    """Switch the linear layers and routed experts of `module` to FP8 in place, except those named
    by `exclude` (default: embedding, output head, MoE router). Returns {"linear": n, "experts": m}.

    recipe: "blockwise" (DeepSeek-V3's 1x128 / 128x128 tiles) or "rowwise". emulate: None = the
    FP8 kernels for CUDA inputs and the float32 emulation elsewhere (a warning when no CUDA GPU is
    present); True = always the emulation; False = always the kernels (a GPU that runs `recipe` is
    required: ConfigError naming training.use_fp8). expert_wgrad: the routed experts' weight
    gradients under the blockwise recipe, "bf16" (torch's grouped GEMM on the unquantized operands,
    as the row-wise recipe always does) or "fp8" (1x128 tiles along the tokens, the Triton kernel;
    a warning on CUDA: see `FP8_EXPERT_WGRAD_WARNING`). Weights may be DTensors (tensor parallelism,
    FSDP2); parameters, names and state dicts are unchanged, so this may run before or after sharding.
    """
    if recipe not in RECIPES:
        raise ConfigError(f"training.fp8_recipe: must be one of {', '.join(RECIPES)}, got {recipe!r}")
    if expert_wgrad not in ("fp8", "bf16"):
        raise ConfigError(f"training.fp8_expert_wgrad: must be bf16 or fp8, got {expert_wgrad!r}")
    if recipe == "blockwise" and expert_wgrad == "fp8" and emulate is not True and torch.cuda.is_available():
        _warn_once("expert-wgrad", FP8_EXPERT_WGRAD_WARNING)
    if emulate is False or (emulate is None and torch.cuda.is_available()):
        check_fp8_supported(recipe)
    if emulate is None and not torch.cuda.is_available():
        _warn_once("emulate", "training.use_fp8: no CUDA GPU; FP8 runs as its float32 emulation (same "
                              "quantization, for numerics and tests; slower than plain training)")
    counts = {"linear": 0, "experts": 0}
    for name, sub in module.named_modules():
        if not name or fp8_excluded(name, exclude):
            continue
        w = sub.weight if isinstance(sub, nn.Linear) else getattr(sub, "w1", None)
        if recipe == "rowwise" and w is not None and not is_dtensor(w) and not _aligned(*w.shape[-2:]):
            continue  # the row-wise kernels need dimensions that are multiples of 16
        if recipe == "blockwise" and _swap_class(sub, SwiGLU, Float8SwiGLU):
            continue  # its projections are converted below; it runs them as one product when it can
        if _swap_class(sub, nn.Linear, Float8Linear):
            kind = "linear"
        elif experts and _swap_class(sub, GroupedExperts, Float8GroupedExperts):
            kind = "experts"
        else:
            continue
        sub.fp8_emulate, sub.fp8_recipe = emulate, recipe
        if kind == "experts":
            sub.fp8_wgrad = expert_wgrad
        counts[kind] += 1
    return counts


_DERIVED: dict[tuple[type, type], type] = {}


def _swap_class(module: nn.Module, base: type, fp8_cls: type) -> bool:
    """Make `module` (of class `base`, or of a wrapper subclass such as FSDP2's `FSDP<base>`) an
    instance of `fp8_cls`, keeping the wrapper. False when it is neither."""
    cls = type(module)
    if cls is base:
        module.__class__ = fp8_cls
        return True
    if base in cls.__bases__ and not issubclass(cls, fp8_cls):
        key = (cls, fp8_cls)
        if key not in _DERIVED:
            bases = tuple(fp8_cls if b is base else b for b in cls.__bases__)
            _DERIVED[key] = type(cls.__name__.replace(base.__name__, fp8_cls.__name__), bases, {})
        module.__class__ = _DERIVED[key]
        return True
    return False


def set_fp8_enabled(model: nn.Module, enabled: bool) -> None:
    """Turn the FP8 products of converted layers on or off (off = the plain bf16 layers)."""
    for module in model.modules():
        if hasattr(module, "fp8_enabled") and isinstance(module, nn.Module):
            module.fp8_enabled = enabled
