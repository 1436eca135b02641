"""Training: data, loss, schedule and the training loop."""

from pipeline.training.trainer import Trainer, TrainResult, train, train_folds

__all__ = ["TrainResult", "Trainer", "train", "train_folds"]
