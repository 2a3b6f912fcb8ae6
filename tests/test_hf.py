"""Hugging Face checkpoints: loading, saving, FP8, streaming conversion, memory and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import tiny_model_config
from safetensors import safe_open
from safetensors.torch import save_file

from lit_deepseek.checkpoint.hf import (
    CheckpointError,
    convert,
    hf_to_native,
    load_hf_model,
    load_native_model,
    model_config_from_hf,
    model_config_to_hf,
    save_hf_model,
)
from lit_deepseek.config import DeepSeekConfig
from lit_deepseek.model import DeepSeekV3

REPO = Path(__file__).resolve().parents[1]

# config.json of the released DeepSeek-V3 (671B) checkpoint, legacy rope_scaling layout
DEEPSEEK_V3_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 129280,
    "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
    "num_nextn_predict_layers": 1, "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1,
    "n_routed_experts": 256, "ep_size": 1, "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 8,
    "topk_group": 4, "num_experts_per_tok": 8, "moe_layer_freq": 1, "first_k_dense_replace": 3,
    "norm_topk_prob": True, "scoring_func": "sigmoid", "aux_loss_alpha": 0.001, "seq_aux": True, "hidden_act": "silu",
    "max_position_embeddings": 163840, "initializer_range": 0.02, "rms_norm_eps": 1e-06, "use_cache": True,
    "rope_theta": 10000, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
}


def _model(cfg, seed: int = 0) -> DeepSeekV3:
    torch.manual_seed(seed)
    model = DeepSeekV3(cfg).eval()
    for moe in model.moe_layers():
        moe.expert_bias.uniform_(-0.1, 0.1)
    return model


def _tokens(cfg, seq: int = 12) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (2, seq), generator=torch.Generator().manual_seed(0))


def _all_tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


# ------------------------------------------------------------------------------------------ config


def test_released_config_maps_to_671b_parameters():
    cfg = model_config_from_hf(DEEPSEEK_V3_CONFIG)
    assert (cfg.num_layers, cfg.first_dense_layers, cfg.mtp_depth) == (61, 3, 1)
    assert (cfg.mla.d_q_latent, cfg.mla.d_latent, cfg.mla.rope_factor) == (1536, 512, 40.0)
    assert (cfg.moe.num_expert_groups, cfg.moe.num_limited_groups, cfg.moe.route_scale) == (8, 4, 2.5)
    run = DeepSeekConfig(model=cfg)
    assert abs(run.total_params() / 671e9 - 1) < 0.005
    # the report's 685B checkpoint = main model + MTP module incl. its copies of embedding and head
    assert abs((run.total_params(include_mtp=True) + 2 * 129280 * 7168) / 685e9 - 1) < 0.01


def test_config_round_trip_and_transformers_accepts_it():
    transformers = pytest.importorskip("transformers")
    cfg = tiny_model_config(**{"mla.rope_factor": 4.0, "mla.rope_original_context_length": 16})
    hf = model_config_to_hf(cfg)
    assert hf["architectures"] == ["DeepseekV3ForCausalLM"] and hf["model_type"] == "deepseek_v3"
    back = model_config_from_hf(hf)
    assert back.mla == cfg.mla and back.num_layers == cfg.num_layers and back.mtp_depth == cfg.mtp_depth
    assert back.moe.num_experts == cfg.moe.num_experts and back.moe.route_scale == cfg.moe.route_scale
    hf_cfg = transformers.DeepseekV3Config(**{k: v for k, v in hf.items() if k not in ("architectures", "model_type")})
    assert hf_cfg.rope_parameters["rope_type"] == "yarn"


# ------------------------------------------------------------------------------------------ load / save


def test_load_checkpoint_written_by_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = tiny_model_config(mtp_depth=0)
    hf_cfg = model_config_to_hf(cfg)
    config = transformers.DeepseekV3Config(**{k: v for k, v in hf_cfg.items()
                                               if k not in ("architectures", "model_type")})
    torch.manual_seed(0)
    reference = transformers.DeepseekV3ForCausalLM(config).eval()
    with torch.no_grad():
        for layer in reference.model.layers[cfg.first_dense_layers:]:
            layer.mlp.gate.e_score_correction_bias.uniform_(-0.1, 0.1)
    reference.save_pretrained(tmp_path)
    model = load_hf_model(tmp_path)
    ids = _tokens(cfg)
    with torch.no_grad():
        diff = (model(ids) - reference(ids).logits).abs().max() / reference(ids).logits.abs().max()
    assert diff < 1e-5


def test_save_then_load_round_trip_with_mtp_in_the_official_layout(tmp_path):
    cfg = tiny_model_config(mtp_depth=2)
    model = _model(cfg)
    save_hf_model(model, tmp_path, max_shard_size="64KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 4 and all((tmp_path / f).is_file() for f in files)
    names = set(index["weight_map"])
    for k in (3, 4):  # MTP modules after the 3 main layers
        for suffix in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                       "shared_head.head.weight", "embed_tokens.weight", "mlp.experts.7.down_proj.weight",
                       "self_attn.kv_b_proj.weight"):
            assert f"model.layers.{k}.{suffix}" in names
    loaded = load_hf_model(tmp_path)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    ids = _tokens(cfg)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, return_hidden=True)[1][1], model(ids, return_hidden=True)[1][1])


def test_load_in_bfloat16_keeps_router_bias_in_float32(tmp_path):
    cfg = tiny_model_config()
    save_hf_model(_model(cfg), tmp_path)
    model = load_hf_model(tmp_path, dtype=torch.bfloat16)
    assert model.embed.weight.dtype == torch.bfloat16
    assert model.moe_layers()[0].expert_bias.dtype == torch.float32
    assert model(_tokens(cfg)).dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------ FP8


def _quantize_blockwise(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = -(-w.shape[0] // 128), -(-w.shape[1] // 128)
    scale = torch.zeros(rows, cols)
    q = torch.empty(w.shape, dtype=torch.float8_e4m3fn)
    for i in range(rows):
        for j in range(cols):
            block = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
            scale[i, j] = block.abs().max() / 448.0
            q[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = (block / scale[i, j]).to(torch.float8_e4m3fn)
    return q, scale


def test_fp8_checkpoint_is_dequantized_per_128_block(tmp_path):
    cfg = tiny_model_config(init_std=0.05, **{"mla.d_model": 160, "moe.expert_intermediate_size": 136,
                                              "dense_intermediate_size": 200})
    model = _model(cfg)
    src = save_hf_model(model, tmp_path / "bf16")
    fp8_dir = tmp_path / "fp8"
    fp8_dir.mkdir()
    expected = {}
    for file in sorted(src.glob("*.safetensors")):
        tensors = {}
        with safe_open(str(file), "pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                quantize = (t.dim() == 2 and "proj" in name)  # linear layers, as in DeepSeek's release
                if quantize:
                    q, s = _quantize_blockwise(t)
                    tensors[name], tensors[name + "_scale_inv"] = q, s
                    full = s.repeat_interleave(128, 0)[:t.shape[0]].repeat_interleave(128, 1)[:, :t.shape[1]]
                    expected[name] = q.float() * full
                else:
                    tensors[name] = t
        save_file(tensors, str(fp8_dir / file.name))
    (fp8_dir / "model.safetensors.index.json").write_text((src / "model.safetensors.index.json").read_text())
    config = json.loads((src / "config.json").read_text())
    (fp8_dir / "config.json").write_text(json.dumps(config | {"quantization_config": {"fmt": "e4m3"}}))
    assert any(t.dtype == torch.float8_e4m3fn for t in _all_tensors(fp8_dir).values())
    loaded = load_hf_model(fp8_dir, dtype=torch.float32)
    state = loaded.state_dict()
    assert len(expected) > 20
    for name, want in expected.items():
        (target,) = hf_to_native(name, cfg)
        got = state[target.name] if target.expert is None else state[target.name][target.expert]
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)
    # what was not quantized is loaded unchanged
    assert torch.equal(state["embed.weight"], model.embed.weight)
    assert torch.equal(state["layers.1.ffn.expert_bias"], model.layers["1"].ffn.expert_bias)


# ------------------------------------------------------------------------------------------ conversion


def test_convert_hf_native_hf_round_trip(tmp_path):
    cfg = tiny_model_config(mtp_depth=1)
    model = _model(cfg)
    src = save_hf_model(model, tmp_path / "hf", max_shard_size="64KB")
    native = convert(src, tmp_path / "native", to="native", max_shard_size="64KB")
    assert (native / "model.yaml").is_file() and len(list(native.glob("*.safetensors"))) > 2
    from_native = load_native_model(native)
    for (name, a), b in zip(model.state_dict().items(), from_native.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    back = convert(native, tmp_path / "hf2", to="hf", max_shard_size="64KB")
    original, round_trip = _all_tensors(src), _all_tensors(back)
    assert original.keys() == round_trip.keys()
    assert all(torch.equal(original[k], round_trip[k]) for k in original)
    assert model_config_from_hf(json.loads((back / "config.json").read_text())) == model_config_from_hf(
        json.loads((src / "config.json").read_text()))


_RSS_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from conftest import tiny_model_config
    from lit_deepseek.checkpoint.hf import convert
    from lit_deepseek.model import DeepSeekV3

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    with torch.device("meta"):  # warm-up: meta-device kernels load lazily on first use
        DeepSeekV3(tiny_model_config())
    baseline = status("VmRSS:")
    convert(sys.argv[1], sys.argv[2], to=sys.argv[3], max_shard_size=sys.argv[4])
    print(json.dumps({"baseline": baseline, "peak": status("VmHWM:")}))
""")


def test_conversion_streams_shard_by_shard(tmp_path):
    """Peak memory of a file-to-file conversion stays well below the checkpoint size."""
    cfg = tiny_model_config(vocab_size=16384, num_layers=8, mtp_depth=0, dense_intermediate_size=512, **{
        "mla.d_model": 384, "mla.d_latent": 64, "mla.d_q_latent": 96, "moe.num_experts": 16,
        "moe.expert_intermediate_size": 256})
    src = save_hf_model(DeepSeekV3(cfg), tmp_path / "hf", max_shard_size="16MB")
    size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    shards = len(list(src.glob("*.safetensors")))
    assert size > 150e6 and shards >= 8
    results = {}
    for direction, source, dest in (("native", src, tmp_path / "native"), ("hf", tmp_path / "native", tmp_path / "hf2")):
        proc = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(source), str(dest), direction, "16MB"],
                              capture_output=True, text=True, cwd=REPO, env={"PYTHONPATH": f"{REPO}:{REPO / 'tests'}", "PATH": ""},
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        results[direction] = json.loads(proc.stdout.strip().splitlines()[-1])
    for direction, r in results.items():
        extra = r["peak"] - r["baseline"]
        print(f"\nconvert --to {direction}: checkpoint {size / 1e6:.0f} MB in {shards} shards, "
              f"baseline RSS {r['baseline'] / 1e6:.0f} MB, peak {r['peak'] / 1e6:.0f} MB, "
              f"peak - baseline {extra / 1e6:.0f} MB")
        assert extra < 0.5 * size
    assert _all_tensors(src).keys() == _all_tensors(tmp_path / "hf2").keys()


# ------------------------------------------------------------------------------------------ bad input


@pytest.fixture
def saved(tmp_path) -> Path:
    cfg = tiny_model_config(mtp_depth=0)
    return save_hf_model(_model(cfg), tmp_path / "ckpt", max_shard_size="64KB")


def _edit_shard_holding(path: Path, name: str, edit) -> None:
    index = json.loads((path / "model.safetensors.index.json").read_text())
    file = path / index["weight_map"][name]
    with safe_open(str(file), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors)
    save_file(tensors, str(file))
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if k in tensors or v != file.name}
    index["weight_map"].update(dict.fromkeys(tensors, file.name))
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


def test_missing_tensor_is_named(saved):
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    _edit_shard_holding(saved, name, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=r"missing tensors: model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight"):
        load_hf_model(saved)


def test_unexpected_tensor_is_named(saved):
    name = "model.layers.0.self_attn.kv_b_proj.weight"
    _edit_shard_holding(saved, name, lambda t: t.update({"model.layers.0.self_attn.rogue.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensors.*model\.layers\.0\.self_attn\.rogue\.weight"):
        load_hf_model(saved)


def test_wrong_shape_is_named(saved):
    name = "model.layers.2.self_attn.o_proj.weight"
    _edit_shard_holding(saved, name, lambda t: t.update({name: torch.zeros(3, 3)}))
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.self_attn\.o_proj\.weight has shape \[3, 3\], "
                                              r"expected \[32, 24\]"):
        load_hf_model(saved)


def test_other_architecture_is_rejected(saved):
    config = json.loads((saved / "config.json").read_text())
    config.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"model_type 'llama'.*LlamaForCausalLM.*not supported"):
        load_hf_model(saved)
    with pytest.raises(CheckpointError, match="no config.json"):
        load_hf_model(saved / "nowhere")


def test_tied_embeddings_round_trip(tmp_path):
    cfg = tiny_model_config(tie_word_embeddings=True, mtp_depth=0)
    model = _model(cfg)
    save_hf_model(model, tmp_path)
    assert "lm_head.weight" not in json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    loaded = load_hf_model(tmp_path)
    assert loaded.head.weight is loaded.embed.weight
    ids = _tokens(cfg)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids))


def test_native_checkpoint_with_missing_tensor_is_named(tmp_path):
    cfg = tiny_model_config(mtp_depth=0)
    native = convert(save_hf_model(_model(cfg), tmp_path / "hf"), tmp_path / "native", to="native")
    _edit_shard_holding(native, "layers.1.ffn.experts.w3", lambda t: t.pop("layers.1.ffn.experts.w3"))
    with pytest.raises(CheckpointError, match=r"missing tensors: layers\.1\.ffn\.experts\.w3"):
        load_native_model(native)
    with pytest.raises(CheckpointError, match="missing tensors"):
        convert(native, tmp_path / "back", to="hf")
