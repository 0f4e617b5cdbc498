"""Training-loop pieces for train_net.py: trainer, atomic checkpointer, EMA, CPU-capable launch, param groups,
freezing."""

from .checkpoint import AtomicDetectionCheckpointer
from .ema import EMAHook, ModelEMA, unwrap_model
from .freeze import freeze_all_but
from .launch import launch
from .param_groups import detr_param_groups
from .trainer import DetrTrainer, NonFiniteLossError, resolve_amp

__all__ = [
    "AtomicDetectionCheckpointer",
    "DetrTrainer",
    "EMAHook",
    "ModelEMA",
    "NonFiniteLossError",
    "detr_param_groups",
    "freeze_all_but",
    "launch",
    "resolve_amp",
    "unwrap_model",
]
