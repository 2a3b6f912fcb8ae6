"""Lightning strategies for any TP x PP x EP x DP layout: one for the Trainer, one for Fabric.

Both do the same four things, in this order:

1. take the resolved `Layout` (the CLI's, or `validate_config` against the world size) before any
   process group exists, so a bad layout is one line and never a hang,
2. create the default process group through Lightning's cluster environment (torchrun, SLURM,
   Lightning's own launcher; NCCL on GPUs, gloo on CPU),
3. build the layout's mesh and the `DistributedPlan` (``strategy.plan``) that the training step
   uses (`lit_deepseek.training.step.train_step`),
4. tell the data module its data-parallel slice: ``set_data_parallel(rank in dp_ep, EP x DP)``.

Checkpoints are distributed (`lit_deepseek.parallel.checkpoint`): a folder that any other layout,
or a single process, can resume from.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional, Union

import torch
from lightning.fabric.strategies import ModelParallelStrategy as FabricModelParallelStrategy
from lightning.fabric.utilities.distributed import _distributed_is_initialized
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.constants import default_pg_timeout
from torch.optim import Optimizer

from lit_deepseek.config import DeepSeekConfig, validate_config
from lit_deepseek.data.datamodule import DataParallelData
from lit_deepseek.parallel.checkpoint import load_checkpoint, save_checkpoint
from lit_deepseek.parallel.layout import Layout
from lit_deepseek.parallel.plan import DistributedPlan

_META_KEYS = ("state_dict", "optimizer_states")


def _device_type(device: torch.device) -> str:
    return "cuda" if device.type == "cuda" else device.type


def _layout(cfg: DeepSeekConfig, layout: Optional[Layout], world_size: int) -> Layout:
    """The given layout when it was resolved for this world size, else the config's (or its one-line error)."""
    if layout is not None and layout.world_size == world_size:
        return layout
    return validate_config(cfg, world_size)


def _connect_data(datamodule: Any, plan: DistributedPlan) -> None:
    if isinstance(datamodule, DataParallelData):
        datamodule.set_data_parallel(plan.data_parallel_rank, plan.data_parallel_size)


def _unwrap_optimizer(optimizer: Any) -> Optimizer:
    while hasattr(optimizer, "_optimizer"):
        optimizer = optimizer._optimizer
    return optimizer


class DeepSeekStrategy(ModelParallelStrategy):
    """Trainer strategy: 4D parallelism from a `DeepSeekConfig`'s ``parallel`` section.

    The LightningModule builds the plain model in ``configure_model`` and hands it to
    ``self.trainer.strategy.plan.parallelize``; it steps with manual optimisation through the
    same plan. ``config`` may be omitted when the LightningModule carries ``model_config``,
    ``training_config`` and ``parallel_config`` attributes; ``layout`` is the CLI's resolved one.
    """

    def __init__(self, config: Optional[DeepSeekConfig] = None, process_group_backend: Optional[str] = None,
                 timeout: Optional[timedelta] = default_pg_timeout, layout: Optional[Layout] = None) -> None:
        super().__init__(save_distributed_checkpoint=True, process_group_backend=process_group_backend,
                         timeout=timeout)
        self.config = config
        self.layout = layout
        self.plan: Optional[DistributedPlan] = None

    # ------------------------------------------------------------------ setup
    def _resolved_config(self) -> DeepSeekConfig:
        if self.config is not None:
            return self.config
        module = self.lightning_module
        try:
            self.config = DeepSeekConfig(model=module.model_config, training=module.training_config,
                                         parallel=module.parallel_config)
        except AttributeError:
            raise ValueError("DeepSeekStrategy: pass config=DeepSeekConfig(...) or use a LightningModule with "
                             "model_config, training_config and parallel_config attributes") from None
        return self.config

    def setup_environment(self) -> None:
        # before any process group exists, so a bad layout cannot hang
        self.layout = _layout(self._resolved_config(), self.layout, self.num_nodes * self.num_processes)
        self.accelerator.setup_device(self.root_device)
        self._setup_distributed()
        self._device_mesh = self.layout.build_mesh(_device_type(self.root_device))
        self.plan = DistributedPlan(self.layout)
        module = self.lightning_module
        if module is not None and module._trainer is not None:
            _connect_data(module._trainer.datamodule, self.plan)

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        assert self.plan is not None
        return {"num_replicas": self.plan.data_parallel_size, "rank": self.plan.data_parallel_rank}

    @contextmanager
    def tensor_init_context(self, empty_init: Optional[bool] = None) -> Any:
        """Build the model on this rank's device (meta when empty_init), never on CPU first."""
        device = torch.device("meta") if empty_init else self.root_device
        with device, self.precision_plugin.tensor_init_context():
            yield

    def model_to_device(self) -> None:
        """Parameters are placed by the plan (DTensor / FSDP); move only what is still on CPU."""
        assert self.model is not None
        if self.root_device.type != "cpu":
            for module in self.model.modules():
                for name, buf in list(module.named_buffers(recurse=False)):
                    if buf is not None and buf.device.type == "cpu":
                        module._buffers[name] = buf.to(self.root_device)

    # ------------------------------------------------------------------ checkpoints
    def _parts(self) -> list[nn.Module]:
        assert self.plan is not None and self.lightning_module is not None
        return self.plan.model_parts(self.lightning_module.model)

    def lightning_module_state_dict(self) -> dict[str, Any]:
        return {}  # written by save_checkpoint as a distributed checkpoint

    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        return {}

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Union[str, Path],
                        storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError("DeepSeekStrategy.save_checkpoint: storage_options are not supported")
        path = Path(self.broadcast(str(filepath)))
        meta = {k: v for k, v in checkpoint.items() if k not in _META_KEYS}
        optimizer = _unwrap_optimizer(self.optimizers[0]) if self.optimizers else None
        save_checkpoint(path, self._parts(), optimizer, self.plan, extra=meta)

    def load_checkpoint(self, checkpoint_path: Union[str, Path], weights_only: Optional[bool] = None) -> dict[str, Any]:
        path = Path(self.broadcast(str(checkpoint_path)))
        optimizer = _unwrap_optimizer(self.optimizers[0]) if self.optimizers else None
        meta = load_checkpoint(path, self._parts(), optimizer, self.plan)
        meta.setdefault("state_dict", {})
        meta["optimizer_states"] = []
        return meta

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        pass  # loaded in load_checkpoint

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        pass

    def remove_checkpoint(self, filepath: Union[str, Path]) -> None:
        if self.is_global_zero:
            from lit_deepseek.parallel.checkpoint import remove_path

            remove_path(Path(filepath))


class DeepSeekFabricStrategy(FabricModelParallelStrategy):
    """Fabric strategy: the same layout, mesh and plan for custom training loops.

    ``fabric.setup_module(model)`` parallelises the model with ``strategy.plan``; build the
    optimizer afterwards with `lit_deepseek.training.step.build_optimizer` (ZeRO-1 needs the
    parallelised model) and step with `lit_deepseek.training.step.train_step`.
    """

    def __init__(self, config: DeepSeekConfig, process_group_backend: Optional[str] = None,
                 timeout: Optional[timedelta] = default_pg_timeout,
                 datamodule: Optional[Any] = None) -> None:
        super().__init__(parallelize_fn=self._parallelize, save_distributed_checkpoint=True,
                         process_group_backend=process_group_backend, timeout=timeout)
        self.config = config
        self.datamodule = datamodule
        self.layout: Optional[Layout] = None
        self.plan: Optional[DistributedPlan] = None

    def _parallelize(self, module: nn.Module, mesh: Any) -> nn.Module:
        assert self.plan is not None
        return self.plan.parallelize(module, self.config)

    def setup_environment(self) -> None:
        self.layout = _layout(self.config, None, self.num_nodes * self.num_processes)
        self.accelerator.setup_device(self.root_device)
        self._setup_distributed()
        self._device_mesh = self.layout.build_mesh(_device_type(self.root_device))
        self.plan = DistributedPlan(self.layout)
        if self.datamodule is not None:
            _connect_data(self.datamodule, self.plan)

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        assert self.plan is not None
        return {"num_replicas": self.plan.data_parallel_size, "rank": self.plan.data_parallel_rank}

    def module_init_context(self, empty_init: Optional[bool] = None) -> Any:
        from contextlib import ExitStack

        stack = ExitStack()
        stack.enter_context(torch.device("meta") if empty_init else self.root_device)
        stack.enter_context(self.precision.module_init_context())
        return stack

    def save_checkpoint(self, path: Union[str, Path], state: dict[str, Any], storage_options: Optional[Any] = None,
                        filter: Optional[dict[str, Callable[[str, Any], bool]]] = None) -> None:
        """``state`` holds the model under "model", optionally the optimizer under "optimizer", and
        any picklable extras."""
        if storage_options is not None or filter is not None:
            raise TypeError("DeepSeekFabricStrategy.save_checkpoint: storage_options and filter are not supported")
        assert self.plan is not None
        path = Path(self.broadcast(str(path)))
        extra = {k: v for k, v in state.items() if k not in ("model", "optimizer")}
        optimizer = _unwrap_optimizer(state["optimizer"]) if state.get("optimizer") is not None else None
        save_checkpoint(path, self.plan.model_parts(state["model"]), optimizer, self.plan, extra=extra)

    def load_checkpoint(self, path: Union[str, Path], state: Optional[Any] = None, strict: bool = True,
                        weights_only: Optional[bool] = None) -> dict[str, Any]:
        """Load into ``state["model"]`` (and ``state["optimizer"]``); extras are updated in ``state``
        and the ones not asked for are returned."""
        if not isinstance(state, dict) or "model" not in state:
            raise ValueError("DeepSeekFabricStrategy.load_checkpoint: pass state={'model': model, ...}")
        assert self.plan is not None
        path = Path(self.broadcast(str(path)))
        optimizer = _unwrap_optimizer(state["optimizer"]) if state.get("optimizer") is not None else None
        extra = load_checkpoint(path, self.plan.model_parts(state["model"]), optimizer, self.plan)
        for key in list(extra):
            if key in state:
                state[key] = extra.pop(key)
        return extra

    def barrier(self, *args: Any, **kwargs: Any) -> None:
        if _distributed_is_initialized():
            super().barrier(*args, **kwargs)
