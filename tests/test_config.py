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


def test_memory_estimate_counts_the_kept_fp8_weight_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """One process, blockwise FP8, several micro-batches per step: the weights grow by about 1 byte per
    FP8 weight parameter (the blocks of w kept across the micro-batches)."""
    from lit_deepseek.estimates import fp8_weight_cache_bytes

    cfg = load_config(ROOT / "configs" / "deepseek_v3_small.yaml", validate=False)
    cfg.training.global_batch_size, cfg.training.micro_batch_size = 8, 2
    cfg.parallel.expert_parallel_size = 1  # one process
    plain = cfg.memory_estimate(world_size=1)
    cfg.training.use_fp8, cfg.training.fp8_recipe = True, "blockwise"
    kept = fp8_weight_cache_bytes(cfg, 1)
    b = cfg.param_breakdown()
    assert b["routed_experts"] + b["attention"] < kept < b["main_total"] + b["mtp_total"] - b["embedding"]
    assert cfg.memory_estimate(world_size=1)["weights"] == pytest.approx(plain["weights"] + kept / 1024**3)
    assert f"of which {kept / 1024**3:.1f} FP8 weight blocks kept" in cfg.summary(world_size=1)
    monkeypatch.setenv("LIT_DEEPSEEK_FP8_WEIGHT_CACHE", "0")  # the reuse switched off: nothing kept
    assert fp8_weight_cache_bytes(cfg, 1) == 0 and cfg.memory_estimate(world_size=1)["weights"] == plain["weights"]
    monkeypatch.delenv("LIT_DEEPSEEK_FP8_WEIGHT_CACHE")
    cfg.training.fp8_exclude = ["embed", "head", "gate", "experts"]  # routed experts in bf16: not kept
    dense = fp8_weight_cache_bytes(cfg, 1)
    assert 0 < dense <= kept - b["routed_experts"]
    cfg.training.fp8_exclude = ["embed", "head", "gate"]
    cfg.training.global_batch_size = 2  # one micro-batch: nothing kept
    assert fp8_weight_cache_bytes(cfg, 1) == 0
    cfg.training.global_batch_size, cfg.training.fp8_recipe = 8, "rowwise"
    assert fp8_weight_cache_bytes(cfg, 1) == 0
    cfg.training.fp8_recipe = "blockwise"
    cfg.training.global_batch_size = 16  # EP 4 (ZeRO 1), 2 micro-batches per rank: a quarter of the experts
    cfg.parallel.expert_parallel_size = 4
    assert fp8_weight_cache_bytes(cfg, 4) == pytest.approx(dense + (kept - dense) / 4)
    cfg.parallel.zero_stage = 3  # FSDP2 layouts keep none
    assert fp8_weight_cache_bytes(cfg, 4) == 0
    cfg.parallel.zero_stage, cfg.parallel.tensor_parallel_size, cfg.parallel.expert_parallel_size = 1, 4, 1
    assert fp8_weight_cache_bytes(cfg, 4) == 0  # nor tensor-parallel ones


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


def test_every_numeric_field_has_a_domain_rule() -> None:
    """Each int/float field of every section is covered by FIELD_RULES (or is a layout field checked in
    validate_config), so a new field cannot slip in without a rule."""
    import typing

    from lit_deepseek.config import FIELD_RULES, SECTIONS, MLAConfig, MoEConfig

    layout = {f"parallel.{f.name}" for f in dataclasses.fields(ParallelConfig)}
    sections = dict(SECTIONS, **{"model.mla": MLAConfig, "model.moe": MoEConfig})
    missing = []
    for prefix, cls in sections.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            kind = hints[f.name]
            numeric = kind in (int, float) or (typing.get_origin(kind) is typing.Union
                                                and set(typing.get_args(kind)) & {int, float})
            name = f"{prefix}.{f.name}"
            if numeric and name not in FIELD_RULES and name not in layout:
                missing.append(name)
    assert not missing, missing


@pytest.mark.parametrize("field,value,rule", [
    ("training.learning_rate", -1e-3, "training.learning_rate: must be a positive number"),
    ("training.learning_rate", float("nan"), "training.learning_rate: must be a positive number, got nan"),
    ("training.adam_beta1", 1.0, "training.adam_beta1: must be in [0, 1)"),
    ("training.adam_eps", float("inf"), "training.adam_eps: must be a positive number"),
    ("training.max_steps", 0, "training.max_steps: must be a positive number"),
    ("training.val_every_n_steps", -5, "training.val_every_n_steps"),
    ("training.seed", -1, "training.seed: must be an integer in [0, 2**32)"),
    ("model.init_std", 0.0, "model.init_std: must be a positive number"),
    ("model.mla.rope_theta", float("-inf"), "model.mla.rope_theta"),
    ("model.moe.route_scale", float("nan"), "model.moe.route_scale"),
    ("checkpoint.keep_last", 0, "checkpoint.keep_last: must be >= 1, or -1 to keep all"),
    ("checkpoint.every_n_steps", 0, "checkpoint.every_n_steps"),
    ("logging.log_every_n_steps", 0, "logging.log_every_n_steps"),
    ("logging.run_dir", " ", "logging.run_dir: must not be empty"),
    ("data.num_workers", -1, "data.num_workers"),
])
def test_field_domains_name_the_field_and_the_rule(field: str, value: object, rule: str) -> None:
    cfg = load_config(ROOT / "configs" / "cpu_demo.yaml", overrides={field: value}, validate=False)
    with pytest.raises(ConfigError) as info:
        cfg.validate(1)
    assert str(info.value).startswith(rule), str(info.value)
    assert "\n" not in str(info.value)


def test_sizes_that_cannot_fit_are_refused_from_the_estimate() -> None:
    from lit_deepseek.config import check_fits

    cfg = load_config(ROOT / "configs" / "cpu_demo.yaml", overrides={"model.moe.num_experts": 2_000_000_000})
    with pytest.raises(ConfigError, match=r"^model.moe.num_experts: the run needs an estimated"):
        check_fits(cfg, 1, device_bytes=64 * 1024**3)
    cfg = load_config(ROOT / "configs" / "cpu_demo.yaml",
                      overrides={"training.seq_length": 10**9, "model.mla.max_context_length": 10**9})
    with pytest.raises(ConfigError, match=r"^training.seq_length: the run needs"):
        check_fits(cfg, 1, device_bytes=64 * 1024**3)
    check_fits(load_config(ROOT / "configs" / "cpu_demo.yaml"), 1, device_bytes=64 * 1024**3)  # the demo fits


def test_empty_file_and_directory_as_config(tmp_path: Path) -> None:
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(ConfigError, match="empty.yaml is empty"):
        load_config(tmp_path / "empty.yaml")
    with pytest.raises(ConfigError, match="is a directory, not a YAML file"):
        load_config(tmp_path)
