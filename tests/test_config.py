"""Configs load and validate; parameter counts; summary; bad input is one clear line."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from lit_deepseek.config import (
    ConfigError,
    DeepSeekConfig,
    ModelConfig,
    ParallelConfig,
    TrainingConfig,
    load_config,
    validate_config,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml"))
OVERRIDES = sorted((ROOT / "configs" / "overrides").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads_and_validates(path: Path) -> None:
    cfg = load_config(path)
    cfg.validate(cfg.parallel.total_gpus())
    assert cfg.total_params() > 0


@pytest.mark.parametrize("override", OVERRIDES, ids=lambda p: p.name)
@pytest.mark.parametrize("base", ["deepseek_v3_base.yaml", "deepseek_v3_small.yaml", "cpu_demo.yaml"])
def test_customization_overrides_apply_on_top(base: str, override: Path) -> None:
    import yaml

    cfg = load_config(ROOT / "configs" / base, override, validate=False)
    raw = yaml.safe_load(override.read_text())
    for section, values in raw.items():
        node = getattr(cfg, section)
        for key, value in values.items():
            if isinstance(value, dict):
                for sub, subval in value.items():
                    assert getattr(getattr(node, key), sub) == subval
            else:
                assert getattr(node, key) == value


def test_deepseek_v3_parameter_counts() -> None:
    cfg = load_config(ROOT / "configs" / "deepseek_v3_base.yaml")
    total = cfg.total_params()
    assert abs(total - 671e9) / 671e9 < 0.01
    active = cfg.active_params_per_token()
    # 37B is the report's rounded figure; the count excludes the embedding lookup (the same rule
    # gives DeepSeek-V2's published 21B as 20.85B).
    assert 36.5e9 < active < 37.4e9
    assert 11e9 < cfg.mtp_params() < 12.5e9  # layer 61 of the official checkpoint, without its embed/head copies
    assert cfg.total_params(include_mtp=True) == total + cfg.mtp_params()
    assert cfg.parallel.total_gpus() == 32


def test_small_config_matches_spec() -> None:
    cfg = load_config(ROOT / "configs" / "deepseek_v3_small.yaml")
    m = cfg.model
    assert (m.num_layers, m.mla.d_model, m.mla.d_latent, m.moe.num_experts, m.moe.num_experts_per_token) == (
        12, 1024, 256, 16, 2)
    assert m.mla.max_context_length == 8192


def test_spec_validation_snippet(capsys: pytest.CaptureFixture) -> None:
    config = load_config(str(ROOT / "configs" / "deepseek_v3_base.yaml"))
    config.print_summary()
    out = capsys.readouterr().out
    for needle in ("total (main)", "671.03B", "active per token", "MTP modules", "TP 4 x PP 4 x EP 2 x DP 1 = 32",
                   "weights", "gradients", "optimizer", "activations"):
        assert needle in out
    assert config.active_params_per_token() / 1e9 > 36
    assert config.parallel.total_gpus() == 32


def test_memory_estimate_shrinks_with_zero_and_parallelism() -> None:
    cfg = load_config(ROOT / "configs" / "deepseek_v3_small.yaml", validate=False)
    base = cfg.memory_estimate(world_size=4)
    cfg.parallel.zero_stage = 3
    sharded = cfg.memory_estimate(world_size=16)  # DP 4 x EP 4
    assert sharded["weights"] < base["weights"]
    assert sharded["optimizer"] < base["optimizer"]
    cfg.training.activation_checkpointing = "full"
    assert cfg.memory_estimate(16)["activations"] < sharded["activations"]
    for mem in (base, sharded):
        assert mem["total"] == pytest.approx(mem["weights"] + mem["gradients"] + mem["optimizer"] + mem["activations"])


def field_docs(cls: type) -> dict[str, str]:
    """Field docstrings (the string literal under each field) of a config dataclass."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
            docs[node.target.id] = str(nxt.value.value)  # type: ignore[union-attr]
    return docs


def test_every_field_has_a_docstring() -> None:
    from lit_deepseek import config as c

    for cls in (c.MLAConfig, c.MoEConfig, c.ModelConfig, c.ParallelConfig, c.TrainingConfig, c.DataConfig,
                c.CheckpointConfig, c.LoggingConfig):
        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, f"{cls.__name__} fields without docstring: {missing}"


def test_spec_parameters_exist_under_their_names() -> None:
    names = {
        "mla": ["d_model", "d_latent", "use_fp8_kv", "max_context_length", "use_flash_mla"],
        "moe": ["num_experts", "num_experts_per_token", "expert_intermediate_size", "use_aux_loss_free",
                "capacity_factor", "router_aux_loss_weight", "use_deep_ep", "deep_ep_fp8"],
        "parallel": ["tensor_parallel_size", "pipeline_parallel_size", "expert_parallel_size", "data_parallel_size",
                     "zero_stage", "overlap_grad_reduce"],
        "training": ["global_batch_size", "micro_batch_size", "learning_rate", "lr_warmup_steps", "grad_clip",
                     "weight_decay", "seq_length", "use_fp8"],
    }
    cfg = DeepSeekConfig()
    owners = {"mla": cfg.model.mla, "moe": cfg.model.moe, "parallel": cfg.parallel, "training": cfg.training}
    for section, fields in names.items():
        for name in fields:
            assert hasattr(owners[section], name), f"{section}.{name}"
    assert ParallelConfig(tensor_parallel_size=2, expert_parallel_size=2).total_gpus(world_size=16) == 16


BAD = [
    ({"model": {"mla": {"nope": 1}}}, None, "model.mla.nope"),
    ({"model": {"num_layers": "twelve"}}, None, "model.num_layers"),
    ({"parallel": {"tensor_parallel_size": 2, "data_parallel_size": 1}}, 4, "world size is 4"),
    ({"parallel": {"expert_parallel_size": 3}}, 3, "num_experts"),
    ({"parallel": {"tensor_parallel_size": 3}}, 3, "num_heads"),
    ({"parallel": {"pipeline_parallel_size": 8}}, 8, "model.num_layers"),
    ({"model": {"moe": {"num_experts_per_token": 9}}}, None, "num_experts_per_token"),
    ({"model": {"moe": {"num_limited_groups": 3}}}, None, "num_limited_groups"),
    ({"model": {"mla": {"d_latent": 4096}}}, None, "d_latent"),
    ({"training": {"global_batch_size": 10, "micro_batch_size": 4}}, None, "training.global_batch_size"),
]


@pytest.mark.parametrize("overrides,world_size,needle", BAD, ids=[b[2] for b in BAD])
def test_bad_config_is_one_clear_line(overrides: dict, world_size: int, needle: str) -> None:
    from lit_deepseek.config import deep_merge, from_dict, read_yaml

    data = deep_merge(read_yaml(ROOT / "configs" / "cpu_demo.yaml"), overrides)
    with pytest.raises(ConfigError) as err:
        validate_config(from_dict(data), world_size)
    message = str(err.value)
    assert needle in message
    assert "\n" not in message


def test_gradient_accumulation_comes_from_the_layout() -> None:
    cfg = DeepSeekConfig(training=TrainingConfig(global_batch_size=64, micro_batch_size=2),
                         parallel=ParallelConfig(expert_parallel_size=2))
    layout = validate_config(cfg, world_size=4)  # DP 2 x EP 2 data-parallel ranks
    assert (layout.data_parallel_size, layout.accumulation_steps) == (4, 8)
    with pytest.raises(ConfigError, match="training.global_batch_size: 64 must be divisible") as err:
        validate_config(cfg, world_size=6)  # DP 3 x EP 2
    assert "\n" not in str(err.value)


def test_model_config_defaults_are_the_small_shape() -> None:
    m = ModelConfig()
    assert (m.num_layers, m.mla.d_model, m.moe.num_experts) == (12, 1024, 16)
