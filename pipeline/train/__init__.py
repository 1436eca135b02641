"""Training: data, loss, schedule and the training loop."""

from pipeline.train.trainer import TrainResult, Trainer, train

__all__ = ["TrainResult", "Trainer", "train"]
