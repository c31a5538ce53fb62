"""The demo models' training loop lives in the core (``nnobfuscator.jobs.training``); names kept here."""

from nnobfuscator.jobs.training import (
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
