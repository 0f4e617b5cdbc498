"""Training-loop pieces for train_net.py: trainer, atomic checkpointer, EMA, CPU-capable launch, param groups,
freezing, the hook that hands the iteration to the model."""

from .best_checkpoint import BestCheckpointer
from .checkpoint import AtomicDetectionCheckpointer, CheckpointFileError
from .ema import EMAHook, ModelEMA, unwrap_model
from .freeze import freeze_all_but, freeze_for_config
from .launch import launch
from .model_iteration import ModelIterationHook
from .param_groups import detr_param_groups
from .trainer import DetrTrainer, NonFiniteLossError, resolve_amp, trainer_from_config
from .weights import CheckpointMismatchError

__all__ = [
    "AtomicDetectionCheckpointer",
    "BestCheckpointer",
    "CheckpointFileError",
    "CheckpointMismatchError",
    "DetrTrainer",
    "EMAHook",
    "ModelEMA",
    "ModelIterationHook",
    "NonFiniteLossError",
    "detr_param_groups",
    "freeze_all_but",
    "freeze_for_config",
    "launch",
    "resolve_amp",
    "trainer_from_config",
    "unwrap_model",
]
