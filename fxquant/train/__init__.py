"""Training shared by reconstruction PTQ and QAT (fxquant/train/engine.py)."""

from fxquant.train.engine import TrainConfig, Trainer, TrainResult

__all__ = ["TrainConfig", "TrainResult", "Trainer"]
