"""Personalization training: one loop (`loop.py`), methods (`methods/`), data, prior, formats.

from booth.train import TrainConfig, DataConfig, train
train(TrainConfig(method="lora", data=DataConfig("photos/", "a sks dog"), out="runs/dog", steps=300))
"""

from booth.train.config import DataConfig, LoraConfig, LossConfig, OptimConfig, PriorConfig, TrainConfig
from booth.train.loop import TrainingInterrupted, TrainResult, TrainState, train

__all__ = [
    "DataConfig",
    "LoraConfig",
    "LossConfig",
    "OptimConfig",
    "PriorConfig",
    "TrainConfig",
    "TrainResult",
    "TrainState",
    "TrainingInterrupted",
    "train",
]
