"""Hugging Face interop: DeepSeek-V3/V2 checkpoint directories <-> our model and native format.

This is the one place that knows Hugging Face names. Checkpoints are read and written shard by
shard (the model is built on the meta device and filled one shard at a time; file-to-file
conversion never holds more than one output shard plus the routed experts of one layer).

Hugging Face layout (DeepSeek's released checkpoints)::

    model.embed_tokens.weight, model.norm.weight, lm_head.weight
    model.layers.{i}.input_layernorm / post_attention_layernorm
    model.layers.{i}.self_attn.{q_a_proj, q_a_layernorm, q_b_proj | q_proj, kv_a_proj_with_mqa,
                                kv_a_layernorm, kv_b_proj, o_proj}
    model.layers.{i}.mlp.{gate_proj, up_proj, down_proj}                 (dense layers)
    model.layers.{i}.mlp.gate.{weight, e_score_correction_bias}          (MoE layers)
    model.layers.{i}.mlp.shared_experts.{gate_proj, up_proj, down_proj}
    model.layers.{i}.mlp.experts.{e}.{gate_proj, up_proj, down_proj}
    model.layers.{L+k}.{enorm, hnorm, eh_proj, shared_head.norm, shared_head.head, embed_tokens}
                       + the block's own weights                          (MTP module k)

FP8 checkpoints store float8_e4m3fn weights with a `weight_scale_inv` per 128x128 block; they are
dequantized on load.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sys
import warnings
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal, Optional, Union

import torch
from torch import Tensor

from lit_deepseek.config import ConfigError, MLAConfig, ModelConfig, MoEConfig

PathLike = Union[str, Path]

HF_ARCHITECTURES = {"deepseek_v3": "DeepseekV3ForCausalLM", "deepseek_v2": "DeepseekV2ForCausalLM"}
INDEX_NAME = "model.safetensors.index.json"
NATIVE_CONFIG_NAME = "model.yaml"
FP8_BLOCK = 128
_EXPERT_PARTS = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
_EXPERT_PARTS_BACK = {v: k for k, v in _EXPERT_PARTS.items()}


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model, naming the first offending tensors."""


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


def read_hf_config(path: PathLike) -> dict[str, Any]:
    """config.json of a checkpoint directory, rejecting other architectures."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{path}: no config.json (expected a Hugging Face DeepSeek-V3 checkpoint directory)")
    try:
        hf = json.loads(file.read_text())
    except (ValueError, OSError) as exc:
        raise CheckpointError(f"{file}: not a readable JSON file ({exc})") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(hf).__name__}")
    model_type = hf.get("model_type")
    archs = hf.get("architectures") or []
    if model_type not in HF_ARCHITECTURES:
        raise CheckpointError(f"{file}: model_type {model_type!r} (architectures {archs}) is not supported; "
                              f"expected one of {', '.join(HF_ARCHITECTURES)}")
    return hf


def _rope_parameters(hf: dict[str, Any]) -> dict[str, Any]:
    """The rope settings in either the legacy (rope_theta + rope_scaling) or the new layout."""
    params = dict(hf.get("rope_parameters") or {})
    if not params.get("rope_type") and hf.get("rope_scaling"):
        params.update(hf["rope_scaling"])
    params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


# config.json keys of the fields a broken config most often gets wrong (for the error message)
_HF_KEYS = {"model.moe.num_expert_groups": "n_group", "model.moe.num_limited_groups": "topk_group",
            "model.moe.num_experts": "n_routed_experts", "model.moe.num_experts_per_token": "num_experts_per_tok",
            "model.mla.num_heads": "num_attention_heads", "model.mla.d_model": "hidden_size",
            "model.num_layers": "num_hidden_layers", "model.first_dense_layers": "first_k_dense_replace",
            "model.vocab_size": "vocab_size", "model.mla.qk_rope_head_dim": "qk_rope_head_dim",
            "model.mla.d_latent": "kv_lora_rank", "model.mla.max_context_length": "max_position_embeddings"}


def model_config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """ModelConfig from a DeepSeek-V3 (or V2) config.json dict; CheckpointError (one line naming the
    key and the rule) when a key is missing, has the wrong type, or the routing cannot work."""
    try:
        cfg = _model_config_from_hf(hf)
    except KeyError as exc:
        raise CheckpointError(f"config.json: missing key {exc.args[0]!r}") from None
    except (TypeError, ValueError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"config.json: a value has the wrong type ({exc})") from None
    from lit_deepseek.config import DeepSeekConfig, TrainingConfig, validate_config

    check = DeepSeekConfig(model=cfg, training=TrainingConfig(global_batch_size=1, micro_batch_size=1, seq_length=1))
    try:
        validate_config(check)
    except ConfigError as exc:
        field = str(exc).split(":", 1)[0]
        key = f" ({_HF_KEYS[field]} in config.json)" if field in _HF_KEYS else ""
        raise CheckpointError(f"config.json: {exc}{key}") from None
    return cfg


def _model_config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    model_type = hf.get("model_type")
    if model_type not in HF_ARCHITECTURES:
        raise CheckpointError(f"config.json: model_type {model_type!r} is not supported; "
                              f"expected one of {', '.join(HF_ARCHITECTURES)}")
    if hf.get("rope_interleave", True) is False:
        raise CheckpointError("config.json: rope_interleave false is not supported (DeepSeek checkpoints rotate "
                              "interleaved pairs)")
    if hf.get("num_key_value_heads", hf["num_attention_heads"]) != hf["num_attention_heads"]:
        raise CheckpointError("config.json: num_key_value_heads must equal num_attention_heads for MLA")
    rope = _rope_parameters(hf)
    rope_type = rope["rope_type"]
    if rope_type not in ("default", "yarn"):
        raise CheckpointError(f"config.json: rope type {rope_type!r} is not supported (default or yarn)")
    yarn = rope_type == "yarn"
    max_ctx = int(hf.get("max_position_embeddings", 4096))
    original = int(rope.get("original_max_position_embeddings") or max_ctx)
    factor = float(rope.get("factor") or (max_ctx / original)) if yarn else 1.0
    mla = MLAConfig(
        d_model=hf["hidden_size"], d_latent=hf["kv_lora_rank"], d_q_latent=hf.get("q_lora_rank") or 0,
        num_heads=hf["num_attention_heads"], qk_nope_head_dim=hf["qk_nope_head_dim"],
        qk_rope_head_dim=hf["qk_rope_head_dim"], v_head_dim=hf["v_head_dim"], max_context_length=max_ctx,
        rope_theta=float(rope["rope_theta"]), rope_factor=factor, rope_original_context_length=original,
        rope_beta_fast=float(rope.get("beta_fast") or 32.0), rope_beta_slow=float(rope.get("beta_slow") or 1.0),
        rope_mscale=float(rope.get("mscale") or 0.0) if yarn else 1.0,
        rope_mscale_all_dim=float(rope.get("mscale_all_dim") or 0.0) if yarn else 1.0,
    )
    if model_type == "deepseek_v3":
        groups = hf.get("n_group") or 1
        moe = MoEConfig(
            num_experts=hf["n_routed_experts"], num_experts_per_token=hf["num_experts_per_tok"],
            expert_intermediate_size=hf["moe_intermediate_size"], num_shared_experts=hf.get("n_shared_experts") or 0,
            num_expert_groups=groups, num_limited_groups=hf.get("topk_group") or groups,
            score_function=hf.get("scoring_func", "sigmoid"), route_scale=float(hf.get("routed_scaling_factor", 1.0)),
            norm_topk_prob=bool(hf.get("norm_topk_prob", True)), use_aux_loss_free=True,
        )
    else:  # deepseek_v2: softmax affinities, no correction bias, group max, no normalisation
        method = hf.get("topk_method", "greedy")
        groups = (hf.get("n_group") or 1) if method == "group_limited_greedy" else 1
        moe = MoEConfig(
            num_experts=hf["n_routed_experts"], num_experts_per_token=hf["num_experts_per_tok"],
            expert_intermediate_size=hf["moe_intermediate_size"], num_shared_experts=hf.get("n_shared_experts") or 0,
            num_expert_groups=groups, num_limited_groups=(hf.get("topk_group") or 1) if groups > 1 else 1,
            score_function="softmax", route_scale=float(hf.get("routed_scaling_factor", 1.0)),
            norm_topk_prob=False, use_aux_loss_free=False,
        )
    if hf.get("aux_loss_alpha") is not None:
        moe.router_aux_loss_weight = float(hf["aux_loss_alpha"])
    return ModelConfig(
        vocab_size=hf["vocab_size"], num_layers=hf["num_hidden_layers"],
        first_dense_layers=hf.get("first_k_dense_replace", 0) if hf["n_routed_experts"] else hf["num_hidden_layers"],
        dense_intermediate_size=hf["intermediate_size"], mtp_depth=hf.get("num_nextn_predict_layers", 0) or 0,
        init_std=float(hf.get("initializer_range", 0.006)), rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)), mla=mla, moe=moe,
    )


def model_config_to_hf(cfg: ModelConfig, model_type: Literal["deepseek_v3", "deepseek_v2"] = "deepseek_v3",
                       dtype: Optional[torch.dtype] = None) -> dict[str, Any]:
    """config.json dict for transformers' DeepseekV3ForCausalLM (or V2, whose router is softmax-only)."""
    a, e = cfg.mla, cfg.moe
    if model_type == "deepseek_v3" and e.score_function != "sigmoid":
        warnings.warn("transformers' DeepseekV3 router implements sigmoid scores only; a softmax-scored model "
                      "exported as deepseek_v3 will not reproduce its logits there (export as deepseek_v2)",
                      stacklevel=2)
    if model_type == "deepseek_v2" and (e.score_function != "softmax" or e.norm_topk_prob or e.use_aux_loss_free):
        raise CheckpointError("model_config_to_hf: deepseek_v2 needs moe.score_function softmax, "
                              "moe.norm_topk_prob false and moe.use_aux_loss_free false")
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": a.rope_theta}
    if a.rope_factor > 1.0:
        rope = {"rope_type": "yarn", "rope_theta": a.rope_theta, "factor": a.rope_factor,
                "original_max_position_embeddings": a.rope_original_context_length,
                "beta_fast": a.rope_beta_fast, "beta_slow": a.rope_beta_slow,
                "mscale": a.rope_mscale, "mscale_all_dim": a.rope_mscale_all_dim}
    out: dict[str, Any] = {
        "architectures": [HF_ARCHITECTURES[model_type]], "model_type": model_type,
        "vocab_size": cfg.vocab_size, "hidden_size": a.d_model, "intermediate_size": cfg.dense_intermediate_size,
        "moe_intermediate_size": e.expert_intermediate_size, "num_hidden_layers": cfg.num_layers,
        "num_nextn_predict_layers": cfg.mtp_depth, "num_attention_heads": a.num_heads,
        "num_key_value_heads": a.num_heads, "n_shared_experts": e.num_shared_experts,
        "n_routed_experts": e.num_experts, "routed_scaling_factor": e.route_scale,
        "kv_lora_rank": a.d_latent, "q_lora_rank": a.d_q_latent or None,
        "qk_rope_head_dim": a.qk_rope_head_dim, "qk_nope_head_dim": a.qk_nope_head_dim,
        "v_head_dim": a.v_head_dim, "n_group": e.num_expert_groups, "topk_group": e.num_limited_groups,
        "num_experts_per_tok": e.num_experts_per_token, "first_k_dense_replace": cfg.first_dense_layers,
        "norm_topk_prob": e.norm_topk_prob, "scoring_func": e.score_function, "aux_loss_alpha": e.router_aux_loss_weight,
        "hidden_act": "silu", "max_position_embeddings": a.max_context_length, "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.rms_norm_eps, "use_cache": True, "tie_word_embeddings": cfg.tie_word_embeddings,
        "rope_theta": a.rope_theta, "rope_scaling": None if rope["rope_type"] == "default" else
        {k: v for k, v in rope.items() if k != "rope_theta"} | {"type": "yarn"},
        "rope_parameters": rope, "rope_interleave": True, "attention_bias": False, "attention_dropout": 0.0,
    }
    if model_type == "deepseek_v3":
        out["topk_method"] = "noaux_tc"
    else:
        out["topk_method"] = "group_limited_greedy" if e.num_expert_groups > 1 else "greedy"
        out["rope_scaling"] = None if rope["rope_type"] == "default" else out["rope_scaling"]
    if dtype is not None:
        out["torch_dtype"] = str(dtype).removeprefix("torch.")
    return out


# --------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_BLOCK_RULES = [  # (HF block suffix, native block suffix)
    ("input_layernorm.weight", "attn_norm.weight"),
    ("post_attention_layernorm.weight", "ffn_norm.weight"),
    ("mlp.gate.weight", "ffn.gate_weight"),
    ("mlp.gate.e_score_correction_bias", "ffn.expert_bias"),
]


@dataclasses.dataclass(frozen=True)
class Target:
    """Where an HF tensor goes: a native state-dict key, optionally one expert row (or a fused half)."""

    name: str
    expert: Optional[int] = None
    part: Optional[tuple[int, int]] = None  # row range of a fused gate_up tensor (dim 1)


def hf_to_native(hf_name: str, cfg: ModelConfig) -> Optional[list[Target]]:
    """Native target(s) of an HF tensor name; [] for tensors we drop on purpose (the MTP modules'
    copies of the shared embedding and head, rotary tables); None for unknown names."""
    top = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight",
           "lm_head.weight": "head.weight"}
    if hf_name in top:
        return [Target(top[hf_name])]
    m = _LAYER.match(hf_name)
    if m is None:
        return None
    index, rest = int(m.group(1)), m.group(2)
    if rest.endswith("rotary_emb.inv_freq"):
        return []
    if index < cfg.num_layers:
        prefix = f"layers.{index}."
    elif index < cfg.num_layers + cfg.mtp_depth:
        prefix = f"mtp.{index - cfg.num_layers}."
        mtp_own = {"enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight",
                   "eh_proj.weight": "eh_proj.weight", "shared_head.norm.weight": "norm.weight"}
        if rest in mtp_own:
            return [Target(prefix + mtp_own[rest])]
        if rest in ("embed_tokens.weight", "shared_head.head.weight"):
            return []
        prefix += "block."
    else:
        return None
    targets = _block_to_native(rest, index, cfg)
    return None if targets is None else [dataclasses.replace(t, name=prefix + t.name) for t in targets]


def _block_to_native(rest: str, index: int, cfg: ModelConfig) -> Optional[list[Target]]:
    for hf_suffix, native in _BLOCK_RULES:
        if rest == hf_suffix:
            return [Target(native)]
    if rest.startswith("self_attn."):
        return [Target("attn." + rest[len("self_attn."):])]
    if rest.startswith("mlp.shared_experts."):
        return [Target("ffn.shared_experts." + rest[len("mlp.shared_experts."):])]
    m = _EXPERT.match(rest)
    if m:
        return [Target(f"ffn.experts.{_EXPERT_PARTS[m.group(2)]}", expert=int(m.group(1)))]
    if rest == "mlp.experts.gate_up_proj":  # transformers' fused in-memory layout
        inter = cfg.moe.expert_intermediate_size
        return [Target("ffn.experts.w1", part=(0, inter)), Target("ffn.experts.w3", part=(inter, 2 * inter))]
    if rest == "mlp.experts.down_proj":
        return [Target("ffn.experts.w2")]
    m = re.match(r"^mlp\.(gate_proj|up_proj|down_proj)\.weight$", rest)
    if m:
        return [Target(f"ffn.{m.group(1)}.weight")]
    return None


def native_to_hf(name: str, tensor: Tensor, cfg: ModelConfig) -> list[tuple[str, Tensor]]:
    """HF (name, tensor) pairs for one native state-dict entry (stacked experts are split)."""
    top = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
           "head.weight": "lm_head.weight"}
    if name in top:
        return [(top[name], tensor)]
    m = re.match(r"^(layers|mtp)\.(\d+)\.(.+)$", name)
    if m is None:
        raise CheckpointError(f"native_to_hf: unknown tensor {name!r}")
    kind, index, rest = m.group(1), int(m.group(2)), m.group(3)
    if kind == "mtp":
        layer = cfg.num_layers + index
        mtp_own = {"enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight",
                   "eh_proj.weight": "eh_proj.weight", "norm.weight": "shared_head.norm.weight"}
        if rest in mtp_own:
            return [(f"model.layers.{layer}.{mtp_own[rest]}", tensor)]
        if not rest.startswith("block."):
            raise CheckpointError(f"native_to_hf: unknown tensor {name!r}")
        rest = rest[len("block."):]
    else:
        layer = index
    prefix = f"model.layers.{layer}."
    for hf_suffix, native in _BLOCK_RULES:
        if rest == native:
            return [(prefix + hf_suffix, tensor)]
    if rest.startswith("attn."):
        return [(prefix + "self_attn." + rest[len("attn."):], tensor)]
    if rest.startswith("ffn.shared_experts."):
        return [(prefix + "mlp.shared_experts." + rest[len("ffn.shared_experts."):], tensor)]
    m = re.match(r"^ffn\.experts\.(w1|w2|w3)$", rest)
    if m:
        part = _EXPERT_PARTS_BACK[m.group(1)]
        return [(f"{prefix}mlp.experts.{e}.{part}.weight", tensor[e]) for e in range(tensor.shape[0])]
    m = re.match(r"^ffn\.(gate_proj|up_proj|down_proj)\.weight$", rest)
    if m:
        return [(prefix + "mlp." + rest[len("ffn."):], tensor)]
    raise CheckpointError(f"native_to_hf: unknown tensor {name!r}")


def mtp_shared_copies(cfg: ModelConfig, embed: Tensor, head: Tensor) -> list[tuple[str, Tensor]]:
    """The MTP layers' copies of the shared embedding and head, as DeepSeek's checkpoints hold them."""
    out = []
    for k in range(cfg.mtp_depth):
        layer = cfg.num_layers + k
        out += [(f"model.layers.{layer}.embed_tokens.weight", embed),
                (f"model.layers.{layer}.shared_head.head.weight", head)]
    return out


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def _shard_files(path: Path) -> list[Path]:
    index = path / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise CheckpointError(f"{index}: shard files listed but missing: {', '.join(missing[:5])}")
        return [path / f for f in files]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors files and no {INDEX_NAME}")
    return files


def _headers(files: Iterable[Path]) -> dict[str, tuple[Path, list[int], str]]:
    """name -> (file, shape, dtype string) from the safetensors headers, without reading data."""
    out: dict[str, tuple[Path, list[int], str]] = {}
    for file in files:
        with open(file, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        for name, info in header.items():
            if name != "__metadata__":
                out[name] = (file, info["shape"], info["dtype"])
    return out


def _expected_native_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    from lit_deepseek.model import DeepSeekV3

    with torch.device("meta"):
        model = DeepSeekV3(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _target_shape(target: Target, native_shape: tuple[int, ...]) -> tuple[int, ...]:
    if target.expert is not None:
        return native_shape[1:]
    if target.part is not None:
        return (native_shape[0], 2 * native_shape[1], native_shape[2])
    return native_shape


def _fmt_names(names: list[str], limit: int = 5) -> str:
    more = f" (and {len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def drop_missing_mtp(headers: dict[str, tuple[Path, list[int], str]], cfg: ModelConfig, source: str) -> ModelConfig:
    """A checkpoint whose config declares MTP layers but that holds none of their tensors (transformers
    saves DeepseekV3 that way) loads without MTP; says so in one line."""
    if not cfg.mtp_depth:
        return cfg
    pattern = re.compile(r"^model\.layers\.(\d+)\.")
    if any((m := pattern.match(n)) and int(m.group(1)) >= cfg.num_layers for n in headers):
        return cfg
    print(f"lit-deepseek: {source}: config.json declares {cfg.mtp_depth} MTP layer(s) (num_nextn_predict_layers) "
          f"but the checkpoint holds none of their tensors; loading it without MTP (model.mtp_depth 0)",
          file=sys.stderr, flush=True)
    return dataclasses.replace(cfg, mtp_depth=0)


def check_finite(name: str, tensor: Tensor, source: str) -> None:
    """CheckpointError naming the tensor when it holds NaN or Inf."""
    if not tensor.is_floating_point():
        return
    flat = tensor.reshape(-1)
    chunk = 1 << 20  # bounded extra memory, also for the largest tensors
    for start in range(0, flat.numel(), chunk):
        part = flat[start:start + chunk]
        part = part.float() if part.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else part
        if not bool(torch.isfinite(part).all()):
            bad = sum(int((~torch.isfinite(flat[i:i + chunk].float())).sum()) for i in range(0, flat.numel(), chunk))
            raise CheckpointError(f"{source}: tensor {name} holds {bad} NaN/Inf value(s) of {flat.numel()}; "
                                  f"refusing to load it")


def plan_hf_load(headers: dict[str, tuple[Path, list[int], str]], cfg: ModelConfig,
                 source: str) -> dict[str, list[Target]]:
    """Map every HF tensor to its native targets, checking before any data is read that nothing
    is unexpected, wrongly shaped or missing. Returns {hf_name: targets} for tensors to load."""
    expected = _expected_native_shapes(cfg)
    plan: dict[str, list[Target]] = {}
    unexpected: list[str] = []
    covered: dict[str, set] = defaultdict(set)
    for name in sorted(headers, key=_natural_key):
        if name.endswith("_scale_inv"):
            if name.removesuffix("_scale_inv") not in headers:
                unexpected.append(name)
            continue
        targets = hf_to_native(name, cfg)
        if targets is None or any(t.name not in expected for t in targets):
            unexpected.append(name)
            continue
        shape = tuple(headers[name][1])
        for t in targets:
            want = _target_shape(t, expected[t.name])
            if t.part is not None and shape != want:
                raise CheckpointError(f"{source}: tensor {name} has shape {list(shape)}, expected {list(want)}")
            if t.part is None and shape != want:
                raise CheckpointError(f"{source}: tensor {name} has shape {list(shape)}, expected {list(want)}")
            if t.expert is not None and t.expert >= expected[t.name][0]:
                unexpected.append(name)
                continue
            covered[t.name].add(t.expert if t.expert is not None else (t.part or "all"))
        if targets:
            plan[name] = targets
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensors not in a {cfg.num_layers}-layer model "
                              f"(MTP depth {cfg.mtp_depth}): {_fmt_names(unexpected)}")
    optional = {k for k in expected if k.endswith("ffn.expert_bias")}
    if cfg.tie_word_embeddings:
        optional.add("head.weight")
    missing = []
    for key, shape in expected.items():
        got = covered.get(key, set())
        if key.endswith(("experts.w1", "experts.w2", "experts.w3")):
            complete = "all" in got or any(isinstance(x, tuple) for x in got) or set(range(shape[0])) <= got
            if not complete:
                missing.append(_first_missing_hf_name(key, shape, got, cfg))
        elif not got and key not in optional:
            missing.append(native_to_hf(key, torch.empty(0), cfg)[0][0] if "experts" not in key else key)
    if missing:
        raise CheckpointError(f"{source}: missing tensors: {_fmt_names(missing)}")
    return plan


def _first_missing_hf_name(key: str, shape: tuple[int, ...], got: set, cfg: ModelConfig) -> str:
    lacking = next(e for e in range(shape[0]) if e not in got)
    names = native_to_hf(key, torch.empty(shape[0], 0), cfg)
    return names[lacking][0]


def _natural_key(name: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def dequantize_fp8(weight: Tensor, scale_inv: Tensor, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """float8_e4m3fn weight [O, I] times its per-128x128-block scale [ceil(O/128), ceil(I/128)]."""
    out_dim, in_dim = weight.shape
    scale = scale_inv.float().repeat_interleave(FP8_BLOCK, 0)[:out_dim].repeat_interleave(FP8_BLOCK, 1)[:, :in_dim]
    return (weight.float() * scale).to(dtype)


class _ShardReader:
    """Reads tensors from safetensors files, keeping at most the files of the current shard open."""

    def __init__(self, headers: dict[str, tuple[Path, list[int], str]], source: str = "checkpoint") -> None:
        self.headers = headers
        self.source = source
        self._open: dict[Path, Any] = {}

    def get(self, name: str, dtype: torch.dtype) -> Tensor:
        tensor = self._raw(name)
        scale_name = name + "_scale_inv"
        if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            if scale_name not in self.headers:
                raise CheckpointError(f"tensor {name} is FP8 but {scale_name} is missing")
            return dequantize_fp8(tensor, self._raw(scale_name), dtype)
        return tensor.to(dtype) if tensor.is_floating_point() else tensor

    def _raw(self, name: str) -> Tensor:
        from safetensors import safe_open

        file = self.headers[name][0]
        if file not in self._open:
            self._open[file] = safe_open(str(file), framework="pt", device="cpu")
        tensor = self._open[file].get_tensor(name)
        check_finite(name, tensor, self.source)
        return tensor

    def release(self, keep: Optional[Path] = None) -> None:
        for file in [f for f in self._open if f != keep]:
            del self._open[file]


def _checkpoint_dtype(hf: dict[str, Any]) -> torch.dtype:
    name = hf.get("torch_dtype") or hf.get("dtype") or "float32"
    return getattr(torch, str(name).removeprefix("torch."), torch.float32)


def load_hf_model(path: PathLike, dtype: Optional[torch.dtype] = None, device: Union[str, torch.device] = "cpu",
                  dispatcher: Any = None) -> Any:
    """Our DeepSeekV3 from a Hugging Face DeepSeek-V3/V2 checkpoint directory.

    The model is built on the meta device, allocated on `device` in `dtype` (default: the
    checkpoint's torch_dtype, FP8 checkpoints dequantize to bfloat16), then filled shard by shard.
    """
    from lit_deepseek.model import DeepSeekV3

    path = Path(path)
    hf = read_hf_config(path)
    cfg = model_config_from_hf(hf)
    if dtype is None:
        dtype = _checkpoint_dtype(hf)
    files = _shard_files(path)
    headers = _headers(files)
    cfg = drop_missing_mtp(headers, cfg, str(path))
    plan = plan_hf_load(headers, cfg, str(path))
    with torch.device("meta"):
        model = DeepSeekV3(cfg, dispatcher)
    model.to(dtype)
    model.to_empty(device=device)
    model.tie_weights()
    with torch.no_grad():
        model.rope.reset_parameters()  # non-persistent tables; everything else comes from the checkpoint
        for moe in model.moe_layers():
            moe.expert_bias.zero_()
            moe.reset_stats()
        state = model.state_dict(keep_vars=True)
        reader = _ShardReader(headers, str(path))
        by_file: dict[Path, list[str]] = defaultdict(list)
        for name in plan:
            by_file[headers[name][0]].append(name)
        for file in files:
            for name in by_file.get(file, []):
                dest = state[plan[name][0].name]
                tensor = reader.get(name, dest.dtype)
                for target in plan[name]:
                    dest = state[target.name]
                    if target.expert is not None:
                        dest[target.expert].copy_(tensor)
                    elif target.part is not None:
                        dest.copy_(tensor[:, target.part[0]:target.part[1]])
                    else:
                        dest.copy_(tensor)
                del tensor
            reader.release()
    return model


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def parse_size(size: Union[int, str]) -> int:
    """Bytes from an int or a string such as '5GB', '200MB', '64KiB'."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?i?B)?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size: cannot parse {size!r} (use bytes or e.g. '5GB', '200MB')")
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    return int(float(m.group(1)) * base**power)


class ShardWriter:
    """Writes (name, tensor) pairs into numbered safetensors shards of at most max_shard_size bytes
    (a single larger tensor gets a shard of its own) and the index that lists them."""

    def __init__(self, path: Path, max_shard_size: int, prefix: str = "model") -> None:
        self.path, self.max_bytes, self.prefix = path, max_shard_size, prefix
        path.mkdir(parents=True, exist_ok=True)
        self.buffer: dict[str, Tensor] = {}
        self._storages: set[int] = set()
        self.buffer_bytes = 0
        self.written: list[tuple[str, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.buffer and self.buffer_bytes + size > self.max_bytes:
            self.flush()
        tensor = tensor.detach()
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()
        elif (tensor.untyped_storage().nbytes() != size or not tensor.is_contiguous()
              or tensor.untyped_storage().data_ptr() in self._storages):
            tensor = tensor.clone()  # safetensors refuses tensors sharing storage (expert rows, MTP copies)
        self._storages.add(tensor.untyped_storage().data_ptr())
        self.buffer[name] = tensor
        self.buffer_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.buffer:
            return
        tmp_name = f"{self.prefix}-part-{len(self.written) + 1:05d}.safetensors"
        save_file(self.buffer, str(self.path / tmp_name), metadata={"format": "pt"})
        self.written.append((tmp_name, list(self.buffer)))
        self.buffer, self.buffer_bytes, self._storages = {}, 0, set()

    def close(self) -> None:
        """Flush, give the shards their final names (-0000i-of-0000n) and write the index."""
        self.flush()
        n = len(self.written)
        weight_map = {}
        for i, (tmp_name, names) in enumerate(self.written, start=1):
            final = f"{self.prefix}-{i:05d}-of-{n:05d}.safetensors"
            (self.path / tmp_name).rename(self.path / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total_bytes},
                 "weight_map": dict(sorted(weight_map.items(), key=lambda kv: _natural_key(kv[0])))}
        (self.path / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def save_hf_model(model: Any, path: PathLike, max_shard_size: Union[int, str] = "5GB",
                  model_type: Literal["deepseek_v3", "deepseek_v2"] = "deepseek_v3",
                  dtype: Optional[torch.dtype] = None) -> Path:
    """Write `model` as a Hugging Face checkpoint directory (config.json, sharded safetensors and
    index) that transformers loads with the same logits. Tensors are copied to CPU one shard at a time."""
    cfg: ModelConfig = model.cfg
    _check_complete(model)
    path = Path(path)
    writer = ShardWriter(path, parse_size(max_shard_size))
    state = model.state_dict()
    some = next(iter(state.values()))
    out_dtype = dtype or some.dtype
    for name, tensor in state.items():
        if cfg.tie_word_embeddings and name == "head.weight":
            continue
        if model_type == "deepseek_v2" and name.endswith("expert_bias"):
            continue
        keep = tensor.dtype if name.endswith(("expert_bias", "gate_weight")) else out_dtype
        for hf_name, t in native_to_hf(name, tensor, cfg):
            writer.add(hf_name, t.to(keep))
    if cfg.mtp_depth:
        head = state["embed.weight"] if cfg.tie_word_embeddings else state["head.weight"]
        for hf_name, t in mtp_shared_copies(cfg, state["embed.weight"], head):
            writer.add(hf_name, t.to(out_dtype))
    writer.close()
    (path / "config.json").write_text(json.dumps(model_config_to_hf(cfg, model_type, out_dtype), indent=2) + "\n")
    return path


def _check_complete(model: Any) -> None:
    cfg: ModelConfig = model.cfg
    if model.embed is None or model.norm is None or model.head is None or len(model.layers) != cfg.num_layers:
        raise CheckpointError("save_hf_model: the model is a pipeline stage (embed/norm/head or layers missing); "
                              "save a complete model")
    for moe in model.moe_layers():
        if moe.experts.num_local_experts != cfg.moe.num_experts:
            raise CheckpointError("save_hf_model: routed experts are sharded (shard_experts); save a complete model")


# --------------------------------------------------------------------------------------------
# Native format and file-to-file conversion
# --------------------------------------------------------------------------------------------


def write_native_config(cfg: ModelConfig, path: Path) -> None:
    import yaml

    (path / NATIVE_CONFIG_NAME).write_text(yaml.safe_dump({"model": dataclasses.asdict(cfg)}, sort_keys=False))


def read_native_config(path: PathLike) -> ModelConfig:
    import yaml

    from lit_deepseek.config import from_dict

    file = Path(path) / NATIVE_CONFIG_NAME
    if not file.is_file():
        raise CheckpointError(f"{path}: no {NATIVE_CONFIG_NAME} (expected a native lit-deepseek checkpoint)")
    data = yaml.safe_load(file.read_text()) or {}
    if not isinstance(data, dict) or "model" not in data:
        raise CheckpointError(f"{file}: expected a 'model' section")
    return from_dict({"model": data["model"]}).model


def save_native_model(model: Any, path: PathLike, max_shard_size: Union[int, str] = "5GB") -> Path:
    """Our state dict as sharded safetensors plus model.yaml (the model section of a config)."""
    path = Path(path)
    writer = ShardWriter(path, parse_size(max_shard_size))
    for name, tensor in model.state_dict().items():
        writer.add(name, tensor)
    writer.close()
    write_native_config(model.cfg, path)
    return path


def load_native_model(path: PathLike, dtype: Optional[torch.dtype] = None,
                      device: Union[str, torch.device] = "cpu") -> Any:
    """A model from a native checkpoint directory, built on meta and filled shard by shard."""
    from lit_deepseek.model import DeepSeekV3

    path = Path(path)
    cfg = read_native_config(path)
    headers = _headers(_shard_files(path))
    expected = _expected_native_shapes(cfg)
    _check_native(headers, expected, str(path), cfg)
    with torch.device("meta"):
        model = DeepSeekV3(cfg)
    if dtype is not None:
        model.to(dtype)
    model.to_empty(device=device)
    model.init_weights(seed=0)  # buffers (RoPE tables, statistics); every parameter is overwritten below
    reader = _ShardReader(headers)
    state = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for name in sorted(headers, key=lambda n: (str(headers[n][0]), _natural_key(n))):
            state[name].copy_(reader.get(name, state[name].dtype))
    model.tie_weights()
    return model


def _check_native(headers: dict[str, tuple[Path, list[int], str]], expected: dict[str, tuple[int, ...]],
                  source: str, cfg: ModelConfig) -> None:
    unexpected = [n for n in headers if n not in expected]
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensors: {_fmt_names(sorted(unexpected, key=_natural_key))}")
    for name, (_, shape, _) in sorted(headers.items(), key=lambda kv: _natural_key(kv[0])):
        if tuple(shape) != expected[name]:
            raise CheckpointError(f"{source}: tensor {name} has shape {shape}, expected {list(expected[name])}")
    optional = {"head.weight"} if cfg.tie_word_embeddings else set()
    missing = [n for n in expected if n not in headers and n not in optional]
    if missing:
        raise CheckpointError(f"{source}: missing tensors: {_fmt_names(missing)}")


def convert_checkpoint(src: PathLike, dst: PathLike, to: Literal["hf", "native"],
                       max_shard_size: Union[int, str] = "5GB", dtype: Optional[torch.dtype] = None) -> Path:
    """File-to-file conversion between a Hugging Face directory and our native format, streaming:
    at most one output shard and the routed experts of one layer are held in memory."""
    src, dst = Path(src), Path(dst)
    if to not in ("hf", "native"):
        raise ValueError(f"convert: 'to' must be 'hf' or 'native', got {to!r}")
    writer = ShardWriter(dst, parse_size(max_shard_size))
    if to == "native":
        hf = read_hf_config(src)
        cfg = model_config_from_hf(hf)
        out_dtype = dtype or _checkpoint_dtype(hf)
        headers = _headers(_shard_files(src))
        cfg = drop_missing_mtp(headers, cfg, str(src))
        plan = plan_hf_load(headers, cfg, str(src))
        expected = _expected_native_shapes(cfg)
        pending: dict[str, Tensor] = {}
        filled: dict[str, int] = defaultdict(int)
        reader = _ShardReader(headers, str(src))
        for name in sorted(plan, key=lambda n: (str(headers[n][0]), _natural_key(n))):
            keep = torch.float32 if name.endswith(("e_score_correction_bias", "mlp.gate.weight")) else out_dtype
            tensor = reader.get(name, keep)
            for target in plan[name]:
                if target.expert is None and target.part is None:
                    writer.add(target.name, tensor)
                    continue
                if target.name not in pending:
                    pending[target.name] = torch.empty(expected[target.name], dtype=out_dtype)
                if target.part is not None:
                    pending[target.name].copy_(tensor[:, target.part[0]:target.part[1]])
                    filled[target.name] = expected[target.name][0]
                else:
                    pending[target.name][target.expert].copy_(tensor)
                    filled[target.name] += 1
                if filled[target.name] == expected[target.name][0]:
                    writer.add(target.name, pending.pop(target.name))
            del tensor
            reader.release(keep=headers[name][0])
        for name in expected:
            if name.endswith("ffn.expert_bias") and name not in set(_written_names(writer)):
                writer.add(name, torch.zeros(expected[name]))
        writer.close()
        write_native_config(cfg, dst)
        return dst
    cfg = read_native_config(src)
    headers = _headers(_shard_files(src))
    _check_native(headers, _expected_native_shapes(cfg), str(src), cfg)
    reader = _ShardReader(headers, str(src))
    out_dtype = dtype
    embed = head = None
    for name in sorted(headers, key=lambda n: (str(headers[n][0]), _natural_key(n))):
        tensor = reader._raw(name)
        keep = tensor.dtype if name.endswith(("expert_bias", "gate_weight")) or out_dtype is None else out_dtype
        for hf_name, t in native_to_hf(name, tensor, cfg):
            writer.add(hf_name, t.to(keep))
        if cfg.mtp_depth and name in ("embed.weight", "head.weight"):
            if name == "embed.weight":
                embed = tensor.to(keep)
            else:
                head = tensor.to(keep)
        del tensor
        reader.release(keep=headers[name][0])
    if cfg.mtp_depth:
        for hf_name, t in mtp_shared_copies(cfg, embed, head if head is not None else embed):
            writer.add(hf_name, t)
    writer.close()
    some_dtype = out_dtype or _dtype_from_st(next(iter(headers.values()))[2])
    (dst / "config.json").write_text(json.dumps(model_config_to_hf(cfg, dtype=some_dtype), indent=2) + "\n")
    return dst


def _written_names(writer: ShardWriter) -> Iterator[str]:
    yield from writer.buffer
    for _, names in writer.written:
        yield from names


def _dtype_from_st(code: str) -> torch.dtype:
    return {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(code, torch.float32)


def convert(src: PathLike, dst: PathLike, to: Literal["hf", "native"], max_shard_size: Union[int, str] = "5GB",
            dtype: Optional[str] = None) -> Path:
    """CLI entry for `lit-deepseek convert`: `to="native"` reads a Hugging Face directory, `to="hf"`
    reads a native one (model.yaml + safetensors); dtype e.g. 'bfloat16' casts the weights."""
    torch_dtype = None
    if dtype is not None:
        torch_dtype = getattr(torch, dtype, None)
        if not isinstance(torch_dtype, torch.dtype):
            raise ConfigError(f"convert.dtype: unknown dtype {dtype!r} (e.g. float32, bfloat16)")
    # all or nothing: convert into a hidden sibling folder, then publish it (the config file last)
    final = Path(dst)
    final.parent.mkdir(parents=True, exist_ok=True)
    work = final.parent / f".{final.name}.convert-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    try:
        convert_checkpoint(src, work, to, max_shard_size=max_shard_size, dtype=torch_dtype)
        if not final.exists() or (final.is_dir() and not any(final.iterdir())):
            if final.exists():
                final.rmdir()
            os.rename(work, final)
        else:
            configs = ("config.json", NATIVE_CONFIG_NAME)
            for p in sorted(work.iterdir(), key=lambda p: p.name in configs):
                os.replace(p, final / p.name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final

