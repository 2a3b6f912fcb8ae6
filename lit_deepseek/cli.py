"""The `lit-deepseek` command line: a LightningCLI whose config sections are the spec's.

`fit`, `validate` and `test` parse `model` (with `mla`, `moe`), `parallel`, `training`, `data`,
`checkpoint` and `logging` into the typed dataclasses of `lit_deepseek.config`, validate the whole
config against the world size before anything expensive happens (which resolves the one `Layout`
that the strategy then uses), and then build the
LightningModule, DataModule, strategy, callbacks and MLflow logger from them. Lightning's own
`trainer:` section stays available for everything else (devices, num_nodes, accelerator, ...).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Optional

from jsonargparse import Namespace, set_parsing_settings
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lit_deepseek.config import (
    SECTIONS,
    ConfigError,
    DeepSeekConfig,
    check_fits,
    from_dict,
    read_yaml,
    validate_config,
)
from lit_deepseek.parallel.layout import Layout

set_parsing_settings(docstring_parse_attribute_docstrings=True)

# Advice that does not apply here: checkpoints are taken after the optimizer step on purpose, and
# validation losses are already reduced over data-parallel ranks by the training plan.
for _pattern in (".*Using ModelCheckpoint with manual optimization.*", ".*sync_dist=True.*",
                 ".*isinstance\\(treespec, LeafSpec\\).*", ".*Checkpoint directory .* exists and is not empty.*"):
    warnings.filterwarnings("ignore", message=_pattern)


def deepspeed_config() -> str:
    """The shipped DeepSpeed config (package data; `configs/deepspeed_config.json` links to it)."""
    from importlib.resources import files

    return str(files("lit_deepseek") / "deepspeed_config.json")


# Trainer arguments that the spec's sections decide (a value set in `trainer:` that differs from
# Lightning's default still wins).
_DERIVED_TRAINER_KEYS = ("max_steps", "precision", "log_every_n_steps", "val_check_interval", "limit_val_batches",
                         "deterministic", "default_root_dir", "enable_progress_bar", "check_val_every_n_epoch",
                         "num_sanity_val_steps")


class OneLineErrorParser(LightningArgumentParser):
    """Parse errors as one line naming the key and the rule, without the usage dump."""

    def error(self, message: str, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        if getattr(self, "exit_on_error", True) is False:
            return super().error(message, *args, **kwargs)
        text = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
        print(f"lit-deepseek: error: {text}", file=sys.stderr)
        sys.exit(2)


class LitDeepSeekCLI(LightningCLI):
    """LightningCLI with the spec's sections as typed groups."""

    def __init__(self, args: Optional[list[str]] = None, run: bool = True) -> None:
        check_config_files(sys.argv[1:] if args is None else args)
        super().__init__(
            model_class=None,
            datamodule_class=None,
            save_config_callback=None,
            seed_everything_default=False,
            parser_class=OneLineErrorParser,
            auto_configure_optimizers=False,
            load_from_checkpoint_support=False,
            args=args,
            run=run,
            parser_kwargs={"prog": "lit-deepseek", "env_prefix": "LIT_DEEPSEEK"},
        )

    def add_core_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(Trainer, "trainer")
        for name, cls in SECTIONS.items():
            parser.add_class_arguments(cls, name, help=cls.__doc__)

    def _parse_ckpt_path(self) -> None:
        """Hyperparameters come from the config files, not from the checkpoint."""

    def _section_dict(self, ns: Namespace) -> dict[str, Any]:
        return {name: _to_plain(ns.get(name)) for name in SECTIONS}

    def before_instantiate_classes(self) -> None:
        ns = self.config.get(str(self.subcommand), self.config)
        self.deepseek_config = from_dict(self._section_dict(ns))
        trainer_ns = _to_plain(ns.get("trainer")) or {}
        self.world_size = resolve_world_size(trainer_ns)
        self.layout = validate_config(self.deepseek_config, self.world_size)
        check_strategy(self.deepseek_config, self.layout, trainer_ns.get("strategy", "auto"))
        training = self.deepseek_config.training
        if training.use_fp8:  # the hardware, checked here: validation probes no device
            import torch

            from lit_deepseek.kernels.fp8 import check_fp8_supported

            if torch.cuda.is_available():  # without CUDA, FP8 runs as its float32 emulation (one warning)
                check_fp8_supported(training.fp8_recipe)
        import torch

        if str(trainer_ns.get("accelerator") or "auto") in ("auto", "gpu", "cuda") and torch.cuda.is_available():
            if self.subcommand == "fit":  # names the smallest layout change that fits
                check_device_memory(self.deepseek_config, self.world_size, trainer_ns.get("accelerator"))
        else:
            check_fits(self.deepseek_config, self.world_size)  # against host memory
        _warn_unavailable_deep_ep(self.deepseek_config)
        if self.subcommand == "test" and self.deepseek_config.data.test_shards is None:
            raise ConfigError("data.test_shards: `test` needs held-out test shards (the validation shards are not "
                              "a test set); set data.test_shards")

    def instantiate_classes(self) -> None:
        from lit_deepseek.data.datamodule import DeepSeekDataModule
        from lit_deepseek.training.callbacks import (
            AtomicCheckpointIO,
            ExpertLoadHeatmap,
            StopOnSigterm,
            TrackConfig,
            build_mlflow_logger,
            check_tracking_uri,
            checkpoint_callbacks,
            checkpoint_dir,
        )
        from lit_deepseek.training.module import DeepSeekLightningModule
        from lit_deepseek.training.run_guard import launch_rank, lock_run_dir, resolve_resume, tidy_checkpoint_dir

        self.config_init = self.config  # nothing to instantiate: the sections are plain dataclasses
        cfg = self.deepseek_config
        t, lg = cfg.training, cfg.logging
        ns = self.config.get(str(self.subcommand), self.config)
        trainer_cfg = _to_plain(ns.get("trainer")) or {}

        self.model = DeepSeekLightningModule(cfg.model, cfg.training, cfg.parallel, lg.peak_tflops)
        self.datamodule = DeepSeekDataModule(
            data=dataclasses.replace(cfg.data, cache_dir=cfg.data_cache_dir()), seq_length=t.seq_length, micro_batch_size=t.micro_batch_size,
            global_batch_size=t.global_batch_size, seed=t.seed if cfg.data.seed is None else cfg.data.seed,
            val_batches=t.val_batches, batch_per_step=True,
        )
        self.datamodule.check_vocab(cfg.model.vocab_size)
        ckpt_path = ns.get("ckpt_path")
        ckpt_dir = checkpoint_dir(cfg)
        user_logger = trainer_cfg.get("logger")
        if user_logger is not False:
            check_tracking_uri(lg)
        owner = self.subcommand == "fit" and launch_rank() == 0
        if owner:  # one run per run directory
            lock_run_dir(lg.run_dir)
        self.datamodule.check_cache_dir()  # after the run directory's own check: the corpus lives under it by default
        if owner:  # then tidy what an interrupted run left behind
            protect = Path(ckpt_path) if ckpt_path and ckpt_path != "last" else None
            tidy_checkpoint_dir(ckpt_dir, cfg.checkpoint.keep_last, protect=protect)
        if ckpt_path and launch_rank() == 0:
            ckpt_path = resolve_resume(str(ckpt_path), ckpt_dir)
            ns["ckpt_path"] = ckpt_path
        if ckpt_path and Path(ckpt_path).is_file() and self.layout.world_size > 1 \
                and trainer_cfg.get("strategy", "auto") in (None, "auto"):
            raise ConfigError(f"ckpt_path: {ckpt_path} is a one-process checkpoint (one file); parallel layouts "
                              "resume from the folder checkpoints of multi-process runs: resume it on one process")
        resume = bool(ckpt_path)
        config = with_derived_trainer_args({k: _instantiate(v) for k, v in trainer_cfg.items()}, cfg)
        config.pop("callbacks", None)
        user_logger = config.pop("logger", None)
        callbacks: list[Any] = checkpoint_callbacks(cfg.checkpoint, ckpt_dir)
        callbacks.append(StopOnSigterm())
        callbacks.append(TrackConfig(cfg, trainer_cfg))
        callbacks.append(ExpertLoadHeatmap(lg.heatmap_every_n_steps, out_dir=os.path.join(lg.run_dir, "plots")))
        if lg.sample_prompts:
            from lit_deepseek.training.samples import SampleGenerations

            callbacks.append(SampleGenerations(lg.sample_prompts, lg.sample_max_new_tokens, cfg.data.tokenizer))
        config["callbacks"] = callbacks
        if user_logger is False:
            config["logger"] = False
        else:
            config["logger"] = build_mlflow_logger(lg, resume=resume)
        strategy = build_strategy(cfg, self.layout, config.get("strategy", "auto"),
                                  resume_from=resolve_ckpt_path(ckpt_path, checkpoint_dir(cfg)))
        if strategy is not None:
            config["strategy"] = strategy
        plugins = config.get("plugins") or []
        if not isinstance(plugins, list):
            plugins = [plugins]
        if strategy is None:
            plugins.append(AtomicCheckpointIO())
        config["plugins"] = plugins or None
        self.trainer = Trainer(**config)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """As LightningCLI, except that `--print_config` shows the trainer values the sections decide
        (max_steps, precision, ...) instead of Lightning's placeholders."""
        argv = list(sys.argv[1:] if args is None else args)
        flags = [a for a in argv if a == "--print_config" or a.startswith("--print_config=")]
        if not flags or not isinstance(args, (list, type(None))):
            return super().parse_arguments(parser, args)
        with warnings.catch_warnings():  # the flag is taken out of sys.argv's copy on purpose
            warnings.filterwarnings("ignore", message=".*args parameter is intended.*")
            super().parse_arguments(parser, [a for a in argv if a not in flags])
        sub = self.config.get("subcommand")
        ns = self.config.get(sub, self.config) if sub else self.config
        cfg = from_dict(self._section_dict(ns))
        trainer = with_derived_trainer_args(_to_plain(ns.get("trainer")) or {}, cfg)
        for key in _DERIVED_TRAINER_KEYS:
            ns[f"trainer.{key}"] = trainer[key]
        ns["data.cache_dir"] = cfg.data_cache_dir()
        sub_parser = parser._subcommands_action._name_parser_map[sub] if sub else parser
        skip = flags[0].split("=", 1)[1].split(",") if "=" in flags[0] else []
        print(sub_parser.dump(ns, skip_none=False, skip_default="skip_default" in skip), end="")
        sys.exit(0)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """fit, validate and test (prediction is not a training subcommand here)."""
        return {k: v for k, v in LightningCLI.subcommands().items() if k != "predict"}

    def after_fit(self) -> None:
        """Say where the run's outputs went."""
        if self.trainer.is_global_zero:
            print(run_outputs(self.deepseek_config, logged=self.trainer.logger is not None), flush=True)


def check_config_files(args: list[str]) -> None:
    """Each `--config FILE` is a readable, non-empty YAML mapping (ConfigError naming the file otherwise)."""
    for i, arg in enumerate(args):
        value = args[i + 1] if arg in ("--config", "-c") and i + 1 < len(args) else (
            arg.split("=", 1)[1] if arg.startswith("--config=") else None)
        if value is not None and os.path.exists(value):  # anything else is jsonargparse's to judge
            read_yaml(value)


def _warn_unavailable_deep_ep(cfg: DeepSeekConfig) -> None:
    """`model.moe.use_deep_ep` without the deep_ep package or CUDA: one warning, then the built-in dispatcher."""
    import importlib.util

    import torch

    if not cfg.model.moe.use_deep_ep:
        return
    missing = "the deep_ep package is not installed" if importlib.util.find_spec("deep_ep") is None else (
        "no CUDA GPU is available" if not torch.cuda.is_available() else None)
    if missing is None:
        return
    from lightning.pytorch.utilities import rank_zero_warn

    rank_zero_warn(f"model.moe.use_deep_ep: {missing}; tokens are dispatched by the built-in all-to-all instead")
    cfg.model.moe.use_deep_ep = False


def run_outputs(cfg: DeepSeekConfig, logged: bool = True) -> str:
    """Where a finished run left its checkpoints, MLflow store and plots (a few lines)."""
    from lit_deepseek.training.callbacks import artifact_location, checkpoint_dir, tracking_uri

    lines = [f"checkpoints:  {checkpoint_dir(cfg)} (resume with --ckpt_path last)"]
    if logged:
        uri = tracking_uri(cfg.logging)
        lines.append(f"MLflow store: {uri} (view: mlflow ui --backend-store-uri {uri})")
        where = artifact_location(cfg.logging)
        if where:
            lines.append(f"MLflow artifacts (config, expert-load heatmaps): {where}")
    if cfg.logging.heatmap_every_n_steps > 0:
        lines.append(f"expert-load plots: {Path(cfg.logging.run_dir) / 'plots'}")
    return "\n".join(["lit-deepseek: run outputs"] + ["  " + line for line in lines])


def resolve_ckpt_path(ckpt_path: Optional[str], ckpt_dir: Path) -> Optional[Path]:
    """The checkpoint `--ckpt_path` names: a path, or for `last` the newest `last*.ckpt` in the checkpoint folder."""
    if not ckpt_path:
        return None
    if ckpt_path == "last":
        found = sorted(ckpt_dir.glob("last*.ckpt"), key=lambda p: p.stat().st_mtime)
        return found[-1] if found else None
    if ckpt_path in ("best", "hpc", "registry"):
        return None
    return Path(ckpt_path)


def is_distributed_checkpoint(path: Optional[Path]) -> bool:
    """A folder written by `lit_deepseek.parallel.checkpoint` (multi-process runs) rather than one file."""
    return path is not None and path.is_dir() and (path / ".metadata").is_file()


def with_derived_trainer_args(trainer_cfg: dict[str, Any], cfg: DeepSeekConfig) -> dict[str, Any]:
    """The trainer arguments with those the spec's sections decide filled in (a value set in `trainer:` that
    differs from Lightning's default wins)."""
    t, lg = cfg.training, cfg.logging
    derived = {
        "max_steps": t.max_steps,
        "precision": t.precision,
        "log_every_n_steps": lg.log_every_n_steps,
        "val_check_interval": t.val_every_n_steps,
        "check_val_every_n_epoch": None,
        "limit_val_batches": t.val_batches,
        "deterministic": True if t.deterministic else None,
        "default_root_dir": lg.run_dir,
        "enable_progress_bar": lg.progress_bar,
        "num_sanity_val_steps": 0,
    }
    defaults = _trainer_defaults()
    config = dict(trainer_cfg)
    for key in _DERIVED_TRAINER_KEYS:
        if config.get(key, defaults.get(key)) == defaults.get(key):
            config[key] = derived[key]
    return config


def check_device_memory(cfg: DeepSeekConfig, world_size: int, accelerator: Any) -> None:
    """On GPUs, refuse a layout whose memory estimate exceeds the device, naming the smallest change that fits
    (LIT_DEEPSEEK_SKIP_MEMORY_CHECK=1 starts anyway)."""
    import torch

    if str(accelerator or "auto") not in ("auto", "gpu", "cuda") or not torch.cuda.is_available():
        return
    if os.environ.get("LIT_DEEPSEEK_SKIP_MEMORY_CHECK", "") not in ("", "0"):
        return
    from lit_deepseek.planner import memory_check

    memory = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 1024**3
    problem = memory_check(cfg, world_size, memory)
    if problem:
        raise ConfigError(problem)


def check_strategy(cfg: DeepSeekConfig, layout: Layout, requested: Any) -> None:
    """Strategy rules that need no process group: DeepSpeed is data-parallel only; fp16 needs one process."""
    model_parallel = layout.tp * layout.pp * layout.ep > 1
    parallel = layout.world_size > 1
    if isinstance(requested, str) and requested.startswith("deepspeed") and model_parallel:
        raise ConfigError("trainer.strategy: DeepSpeed runs data-parallel layouts only; set "
                          "parallel.tensor_parallel_size, pipeline_parallel_size and expert_parallel_size to 1 "
                          "or leave trainer.strategy at auto")
    if parallel and requested in (None, "auto") and cfg.training.precision == "16-mixed":
        raise ConfigError("training.precision: 16-mixed is not supported by the parallel strategy; use bf16-mixed")


def build_strategy(cfg: DeepSeekConfig, layout: Layout, requested: Any, resume_from: Optional[Path] = None) -> Any:
    """Our parallel strategy whenever more than one process is asked for (any model parallelism is), or when one
    process resumes from a distributed checkpoint folder (which only that strategy reads)."""
    if requested == "deepspeed":
        from lightning.pytorch.strategies import DeepSpeedStrategy

        return DeepSpeedStrategy(config=deepspeed_config())
    if requested not in (None, "auto") or (layout.world_size == 1 and not is_distributed_checkpoint(resume_from)):
        return None
    from lit_deepseek.parallel.strategy import DeepSeekStrategy

    return DeepSeekStrategy(config=cfg, layout=layout)


def resolve_world_size(trainer_cfg: dict[str, Any]) -> int:
    """World size from torchrun/SLURM variables, else trainer.devices x trainer.num_nodes."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    num_nodes = int(trainer_cfg.get("num_nodes") or 1)
    devices = trainer_cfg.get("devices", "auto")
    accelerator = str(trainer_cfg.get("accelerator") or "auto")
    if isinstance(devices, (list, tuple)):
        n = len(devices)
    elif isinstance(devices, int) and devices > 0:
        n = devices
    elif isinstance(devices, str) and devices.isdigit() and int(devices) > 0:
        n = int(devices)
    elif isinstance(devices, str) and "," in devices:
        n = len([d for d in devices.split(",") if d.strip()])
    else:  # "auto" or -1: every accelerator of the kind that will be used
        import torch

        use_cuda = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
        n = torch.cuda.device_count() if use_cuda else 1
    return n * num_nodes


def _trainer_defaults() -> dict[str, Any]:
    import inspect

    return {k: v.default for k, v in inspect.signature(Trainer.__init__).parameters.items()
            if v.default is not inspect.Parameter.empty}


def _instantiate(value: Any) -> Any:
    """Trainer arguments given as {class_path, init_args} (a profiler, plugins) become objects."""
    if isinstance(value, dict) and "class_path" in value:
        from lightning.pytorch.cli import instantiate_class

        return instantiate_class((), value)
    if isinstance(value, list):
        return [_instantiate(v) for v in value]
    return value


def _to_plain(value: Any) -> Any:
    if isinstance(value, Namespace):
        return {k: _to_plain(v) for k, v in vars(value).items() if not k.startswith("__")}
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def summary_main(argv: list[str]) -> int:
    """`lit-deepseek summary --config FILE [--config OVERRIDE] [--world_size N] [--key.path value ...]`."""
    import argparse

    from lit_deepseek.config import dotted_overrides, load_config

    parser = argparse.ArgumentParser(prog="lit-deepseek summary", description="Print parameters, layout and memory.")
    parser.add_argument("--config", "-c", action="append", required=True, help="YAML config (repeatable)")
    parser.add_argument("--world_size", type=int, default=None, help="Validate the layout against this world size")
    parser.add_argument("--gpu_memory", default="80GB", help="GPU memory the estimate is checked against (default 80GB)")
    args, rest = parser.parse_known_args(argv)
    overrides = dotted_overrides(rest)
    cfg = load_config(*args.config, overrides=overrides, world_size=args.world_size)
    cfg.print_summary(args.world_size)
    from lit_deepseek.planner import USABLE_FRACTION, gpus_needed, parse_memory

    memory = parse_memory(args.gpu_memory)
    total = cfg.memory_estimate(args.world_size)["total"]
    if total <= memory * USABLE_FRACTION:
        print(f"Fits {memory:g} GiB GPUs ({USABLE_FRACTION:.0%} usable) in this layout")
    else:
        need = gpus_needed(cfg, memory)
        where = f"needs at least {need} such GPUs" if need else "no GPU count up to 65536 fits"
        print(f"Does NOT fit {memory:g} GiB GPUs ({USABLE_FRACTION:.0%} usable) in this layout; by this estimate it "
              f"{where}: lit-deepseek plan --config ... --gpus N --gpu_memory {args.gpu_memory} lists the layouts")
    return 0


def convert_main(argv: list[str]) -> int:
    """`lit-deepseek convert SRC DST --to {hf,native}`: stream a checkpoint between the two layouts."""
    import argparse

    from lit_deepseek.checkpoint.hf import CheckpointError, convert
    from lit_deepseek.config import ConfigError

    parser = argparse.ArgumentParser(
        prog="lit-deepseek convert",
        description="Convert a Hugging Face DeepSeek-V3/V2 checkpoint directory to the native layout or back, "
                    "shard by shard (never the whole model in memory).")
    parser.add_argument("src", help="source directory (Hugging Face: config.json + safetensors; native: model.yaml "
                                    "+ safetensors)")
    parser.add_argument("dst", help="destination directory")
    parser.add_argument("--to", choices=["hf", "native"], required=True, help="target layout")
    parser.add_argument("--max_shard_size", default="5GB", help="largest output shard, e.g. 5GB or 500MB")
    parser.add_argument("--dtype", default=None, help="cast floating tensors, e.g. bfloat16 (default: keep)")
    args = parser.parse_args(argv)
    try:
        out = convert(args.src, args.dst, to=args.to, max_shard_size=args.max_shard_size, dtype=args.dtype)
    except (CheckpointError, FileNotFoundError) as exc:
        raise ConfigError(f"convert: {exc}") from None
    print(f"wrote {out}")
    return 0
