"""keras-bn: fast batch normalization for Keras 3 (Ioffe & Szegedy, 2015)."""

from keras_bn import callbacks
from keras_bn.batch_normalization import BatchNormalization
from keras_bn.recalibrate import RecalibrationReport, recalibrate
from keras_bn.replace import replace_batchnorm

__version__ = "0.1.0"
__all__ = [
    "BatchNormalization",
    "RecalibrationReport",
    "callbacks",
    "recalibrate",
    "replace_batchnorm",
    "__version__",
]
