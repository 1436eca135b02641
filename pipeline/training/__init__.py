"""Training: data, loss, schedule and the training loop."""

from pipeline.training.trainer import TrainResult, Trainer, train

__all__ = ["TrainResult", "Trainer", "train"]
