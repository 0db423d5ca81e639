"""keras-bn: fast batch normalization for Keras 3 (Ioffe & Szegedy, 2015)."""

import os as _os
import sys as _sys

# The `keras-bn` command is quiet by default, but its entry point imports this
# package, and so Keras and TensorFlow, before the command's own code runs:
# TensorFlow reads its C++ log level once, at import.
if _os.path.basename(_sys.argv[0] if _sys.argv else "") == "keras-bn" and not {
    "--verbose",
    "--debug",
} & set(_sys.argv):
    _os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from keras_bn import _checkout  # noqa: E402

_checkout.load_converters()  # a source checkout: its converters/ folder

# Imported (not only on demand) so that Keras knows `ChannelAffine`, the layer
# `fold_batchnorm` leaves for a batch norm it cannot fold, when it loads a
# folded `.keras` file after `import keras_bn`.
from keras_bn import callbacks, converters  # noqa: E402
from keras_bn.batch_normalization import BatchNormalization  # noqa: E402
from keras_bn.converters import affine as _affine  # noqa: E402, F401
from keras_bn.recalibrate import RecalibrationReport, recalibrate  # noqa: E402
from keras_bn.replace import replace_batchnorm  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "BatchNormalization",
    "RecalibrationReport",
    "callbacks",
    "converters",
    "recalibrate",
    "replace_batchnorm",
    "__version__",
]
