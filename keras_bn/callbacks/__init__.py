"""Training callbacks that record activation and batch-normalization statistics."""

from keras_bn.callbacks._history import StatisticsHistory
from keras_bn.callbacks.activation_statistics import (
    SATURATION_THRESHOLDS,
    ActivationStatistics,
)
from keras_bn.callbacks.batchnorm_statistics import BatchNormStatistics

__all__ = [
    "ActivationStatistics",
    "BatchNormStatistics",
    "SATURATION_THRESHOLDS",
    "StatisticsHistory",
]
