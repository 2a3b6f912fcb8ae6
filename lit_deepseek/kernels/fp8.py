"""FP8 training of the linear layers and the routed experts, with row-wise scaling.

Every matrix product of a converted layer, forward and backward, is written as `A @ B.T` with both
operands quantized to float8 e4m3 along the contraction dimension: one float32 scale per row of A
and per row of B (a power of two, so scaling is exact), and the product accumulated in float32 by
`torch._scaled_mm` (linear layers) or `torch._scaled_grouped_mm` (experts, forward and input
gradient; the expert weight gradient, a product over each expert's own tokens, stays in bf16
through the grouped GEMM). Row-wise scales follow each token and each output channel, so one
outlier only coarsens its own row, the property DeepSeek-V3's 1x128 / 128x128 tiles aim at too.

Layers keep their class hierarchy and parameter names (`convert_to_fp8` swaps `__class__`), so
checkpoints, optimizers and parallel plans are unaffected. Each layer has a reference path with
the same quantization emulated in float32 (`emulate=True`, runs anywhere, also on CPU) and the
plain bf16 layer is one flag away (`fp8_enabled = False`).

Use: `convert_to_fp8(model)` after the model is on the GPU and before `torch.compile`.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_deepseek.config import ConfigError
from lit_deepseek.model.moe import GroupedExperts

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
#: module names (last path component) that stay in high precision
DEFAULT_SKIP = ("head", "lm_head", "embed", "embed_tokens", "gate")


# ---------------------------------------------------------------------------------- quantization
def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [..., K] -> (float8 e4m3 values, float32 dequantization scale [..., 1]) per row.

    The scale is a power of two chosen so that the row's largest magnitude fits under 448.
    """
    amax = x.detach().abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
    scale = torch.exp2(torch.floor(torch.log2(E4M3_MAX / amax)))
    q = (x.float() * scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q, scale.reciprocal()


def _aligned(*dims: int) -> bool:
    return all(d % 16 == 0 for d in dims)


def fp8_mm_t(a: Tensor, b: Tensor, emulate: bool = False, out_dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """a [M, K] @ b[N, K].T with both quantized row-wise along K (float32 accumulation).

    emulate=True computes the same quantized product with dequantized float32 operands (the
    reference path). Shapes the FP8 kernel cannot take (a dim not a multiple of 16) fall back to
    a plain product in out_dtype.
    """
    (_m, k), n = a.shape, b.shape[0]
    if not emulate and not _aligned(k, n):
        return (a.to(out_dtype) @ b.to(out_dtype).t())
    aq, sa = quantize_rows(a)
    bq, sb = quantize_rows(b)
    if emulate:
        return ((aq.float() * sa) @ (bq.float() * sb).t()).to(out_dtype)
    return _scaled_mm_t_op(aq, sa, bq, sb).to(out_dtype)


# The FP8 kernels are called through custom ops: opaque to torch.compile, so a compiled model runs
# exactly the kernels (and operand layouts) that the eager path and the tests use.
@torch.library.custom_op("lit_deepseek::scaled_mm_t", mutates_args=())
def _scaled_mm_t_op(aq: Tensor, sa: Tensor, bq: Tensor, sb: Tensor) -> Tensor:
    """aq [M, K] e4m3 with scales sa [M, 1]; bq [N, K] e4m3 with sb [N, 1] -> bf16 [M, N]."""
    return torch._scaled_mm(aq.contiguous(), bq.contiguous().t(), scale_a=sa.reshape(-1, 1).contiguous(),
                            scale_b=sb.reshape(1, -1).contiguous(), out_dtype=torch.bfloat16)


@_scaled_mm_t_op.register_fake
def _(aq: Tensor, sa: Tensor, bq: Tensor, sb: Tensor) -> Tensor:
    return aq.new_empty(aq.shape[0], bq.shape[0], dtype=torch.bfloat16)


@torch.library.custom_op("lit_deepseek::scaled_grouped_mm_t", mutates_args=())
def _scaled_grouped_mm_t_op(xq: Tensor, sx: Tensor, wq: Tensor, sw: Tensor, offsets: Tensor) -> Tensor:
    """xq [M, K] e4m3 rows sorted by group, sx [M, 1]; wq [E, N, K] e4m3, sw [E, N, 1] -> bf16 [M, N]."""
    return torch._scaled_grouped_mm(xq.contiguous(), wq.contiguous().transpose(-2, -1), sx.reshape(-1).contiguous(),
                                    sw.reshape(sw.shape[0], -1).contiguous(), offs=offsets, out_dtype=torch.bfloat16)


@_scaled_grouped_mm_t_op.register_fake
def _(xq: Tensor, sx: Tensor, wq: Tensor, sw: Tensor, offsets: Tensor) -> Tensor:
    return xq.new_empty(xq.shape[0], wq.shape[1], dtype=torch.bfloat16)


class _Fp8Linear(torch.autograd.Function):
    """y = x @ w.T with all three products of forward and backward in FP8."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, emulate: bool) -> Tensor:
        ctx.save_for_backward(x, w)
        ctx.emulate = emulate
        return fp8_mm_t(x, w, emulate).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, Tensor, None]:
        x, w = ctx.saved_tensors
        g = g.contiguous()
        grad_x = fp8_mm_t(g, w.t().contiguous(), ctx.emulate).to(x.dtype)
        grad_w = fp8_mm_t(g.t().contiguous(), x.t().contiguous(), ctx.emulate).to(w.dtype)
        return grad_x, grad_w, None


class Float8Linear(nn.Linear):
    """nn.Linear whose products run in FP8 (row-wise scales); same parameters and state dict."""

    fp8_enabled: bool = True
    fp8_emulate: bool = False

    def forward(self, x: Tensor) -> Tensor:
        if not self.fp8_enabled:
            return F.linear(x, self.weight, self.bias)
        shape = x.shape
        y = _Fp8Linear.apply(x.reshape(-1, shape[-1]), self.weight, self.fp8_emulate)
        y = y.view(*shape[:-1], y.shape[-1])
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y


# ---------------------------------------------------------------------------------- experts
def _grouped_mm() -> Any:
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def fp8_grouped_mm_t(x: Tensor, w: Tensor, offsets: Tensor, emulate: bool = False) -> Tensor:
    """Rows of x [M, K] sorted by group, group e (rows offsets[e-1]:offsets[e]) times w[e].T
    (w [E, N, K]) -> [M, N] bf16; both operands quantized row-wise along K."""
    xq, sx = quantize_rows(x)
    wq, sw = quantize_rows(w)
    if emulate:
        out = x.new_zeros(x.shape[0], w.shape[1], dtype=torch.bfloat16)
        xd, wd = xq.float() * sx, wq.float() * sw
        start = 0
        for e, end in enumerate(offsets.tolist()):
            if end > start:
                out[start:end] = (xd[start:end] @ wd[e].t()).to(out.dtype)
            start = end
        return out
    return _scaled_grouped_mm_t_op(xq, sx, wq, sw, offsets)


@torch.library.custom_op("lit_deepseek::grouped_weight_grad", mutates_args=())
def _grouped_weight_grad_op(g: Tensor, x: Tensor, offsets: Tensor, num_groups: int) -> Tensor:
    """Opaque to the compiler, so the layouts below are the ones the kernel gets: with g [M, N]
    row-major, g.t() is column-major and no group size needs 16-byte alignment along the tokens."""
    return _grouped_mm()(g.contiguous().t(), x.contiguous(), offs=offsets)


@_grouped_weight_grad_op.register_fake
def _(g: Tensor, x: Tensor, offsets: Tensor, num_groups: int) -> Tensor:
    return g.new_empty(num_groups, g.shape[1], x.shape[1])


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
    return _grouped_weight_grad_op(g, x, offsets, num_groups)


class _Fp8GroupedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, offsets: Tensor, emulate: bool) -> Tensor:
        ctx.save_for_backward(x, w, offsets)
        ctx.emulate = emulate
        return fp8_grouped_mm_t(x, w, offsets, emulate)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, Tensor, None, None]:
        x, w, offsets = ctx.saved_tensors
        g = g.contiguous()
        grad_x = fp8_grouped_mm_t(g, w.transpose(-2, -1).contiguous(), offsets, ctx.emulate).to(x.dtype)
        grad_w = grouped_weight_grad(g.to(x.dtype), x, offsets, w.shape[0], ctx.emulate).to(w.dtype)
        return grad_x, grad_w, None, None


def fp8_grouped_linear(x: Tensor, w: Tensor, offsets: Tensor, emulate: bool = False) -> Tensor:
    """Differentiable grouped x_e @ w[e].T with FP8 forward and input gradient."""
    return _Fp8GroupedLinear.apply(x, w, offsets, emulate)


class Float8GroupedExperts(GroupedExperts):
    """Routed SwiGLU experts with FP8 grouped products; same parameters as GroupedExperts."""

    fp8_enabled: bool = True
    fp8_emulate: bool = False

    def forward(self, x: Tensor, counts: Tensor, use_grouped_mm: Optional[bool] = None) -> Tensor:
        if not self.fp8_enabled:
            return super().forward(x, counts, use_grouped_mm)
        offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
        e = self.fp8_emulate
        h = F.silu(fp8_grouped_linear(x, self.w1, offsets, e)) * fp8_grouped_linear(x, self.w3, offsets, e)
        return fp8_grouped_linear(h, self.w2, offsets, e).to(x.dtype)


def float8_experts_class() -> type:
    """The FP8 subclass of `GroupedExperts` that `convert_to_fp8` switches experts to."""
    return Float8GroupedExperts


# ---------------------------------------------------------------------------------- conversion
def check_fp8_supported() -> None:
    """Raise ConfigError unless a CUDA GPU with compute capability >= 8.9 is present."""
    if not torch.cuda.is_available():
        raise ConfigError("training.use_fp8: FP8 training needs a CUDA GPU with compute capability >= 8.9; "
                          "none is available")
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        raise ConfigError(f"training.use_fp8: FP8 training needs compute capability >= 8.9, "
                          f"this GPU has {major}.{minor}")


def _is_dtensor(t: Tensor) -> bool:
    return type(t).__name__ == "DTensor"


def convert_to_fp8(model: nn.Module, emulate: bool = False, skip: tuple[str, ...] = DEFAULT_SKIP,
                   experts: bool = True) -> dict[str, int]:
    """Switch the linear layers (all but those named in `skip`: output head, embedding, router)
    and the routed experts of `model` to FP8 in place. Returns {"linear": n, "experts": m}.

    emulate=True selects the float32 emulation of the same quantization (any device; for tests);
    otherwise a GPU with compute capability >= 8.9 is required (ConfigError naming
    training.use_fp8). Layers whose weights are DTensors or whose dims are not multiples of 16
    are left as they are.
    """
    if not emulate:
        check_fp8_supported()
    fp8_experts, base_experts = Float8GroupedExperts, GroupedExperts
    counts = {"linear": 0, "experts": 0}
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in skip:
            continue
        if type(module) is nn.Linear:
            if _is_dtensor(module.weight) or not _aligned(*module.weight.shape):
                continue
            module.__class__ = Float8Linear
            module.fp8_emulate = emulate
            counts["linear"] += 1
        elif experts and type(module) is base_experts:
            if any(_is_dtensor(p) for p in module.parameters()) or not _aligned(*module.w1.shape[1:]):
                continue
            module.__class__ = fp8_experts
            module.fp8_emulate = emulate
            counts["experts"] += 1
    return counts


def set_fp8_enabled(model: nn.Module, enabled: bool) -> None:
    """Turn the FP8 products of converted layers on or off (off = the plain bf16 layers)."""
    for module in model.modules():
        if hasattr(module, "fp8_enabled") and isinstance(module, nn.Module):
            module.fp8_enabled = enabled
