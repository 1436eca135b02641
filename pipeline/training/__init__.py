"""Training: data, loss, schedule and the training loop."""

from pipeline.training.trainer import Trainer, TrainResult, train

__all__ = ["TrainResult", "Trainer", "train"]
