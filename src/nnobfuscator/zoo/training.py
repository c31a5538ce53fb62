"""The demo models' training loop lives in ``nnobfuscator.tasks.training``; names kept here."""

from nnobfuscator.tasks.training import (
    evaluate_accuracy,
    evaluate_metric,
    recalibrate_batchnorm,
    train_classifier,
    train_model,
)

__all__ = [
    "evaluate_accuracy",
    "evaluate_metric",
    "recalibrate_batchnorm",
    "train_classifier",
    "train_model",
]
