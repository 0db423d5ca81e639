"""Pure math of folding an inference batch normalization into linear weights.

At inference a batch normalization is the per-channel affine map

    bn(x) = gamma * (x - mean) / sqrt(variance + epsilon) + beta
          = scale * x + shift,
    scale = gamma / sqrt(variance + epsilon),  shift = beta - mean * scale,

so it can be absorbed into the kernel and bias of the neighbouring linear layer
(as PyTorch's `torch.nn.utils.fusion.fuse_conv_bn_weights` does). These are
pure NumPy functions: they never mutate their inputs, return arrays of the
kernel's dtype, and compute in float64.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

#: Kernel layouts (Keras's conventions), by where the output channel lives.
#: "dense": (in, out); "conv": (*kernel_size, in // groups, out), also the
#: pointwise kernel of a separable convolution; "conv_transpose":
#: (*kernel_size, out, in); "depthwise": (*kernel_size, in, depth_multiplier),
#: output channel `c * depth_multiplier + m`.
LAYOUTS = ("dense", "conv", "conv_transpose", "depthwise")
POSITIONS = ("after", "before")


def bn_scale_shift(
    mean: ArrayLike,
    variance: ArrayLike,
    epsilon: float,
    gamma: ArrayLike | None = None,
    beta: ArrayLike | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel `(scale, shift)` of an inference batch normalization.

    Args:
        mean: Moving mean, shape `(C,)`.
        variance: Moving variance, shape `(C,)`, non-negative.
        epsilon: Non-negative float added to the variance.
        gamma: Optional scale `(C,)`; `None` means ones (`scale=False`).
        beta: Optional offset `(C,)`; `None` means zeros (`center=False`).

    Returns:
        Two float64 arrays `(scale, shift)` of shape `(C,)` with
        `bn(x) = scale * x + shift`.

    Example:

    >>> s, t = bn_scale_shift([1.0], [3.0], 1.0, gamma=[2.0], beta=[0.5])
    >>> float(s[0]), float(t[0])
    (1.0, -0.5)
    """
    mean = np.asarray(mean, dtype=np.float64)
    variance = np.asarray(variance, dtype=np.float64)
    if mean.ndim != 1 or variance.shape != mean.shape:
        raise ValueError(
            "Arguments `mean` and `variance` must be vectors of the same length "
            f"(one value per channel). Received: mean.shape={mean.shape}, "
            f"variance.shape={variance.shape}"
        )
    if float(epsilon) < 0:
        raise ValueError(
            f"Argument `epsilon` must be non-negative. Received: epsilon={epsilon}"
        )
    if np.any(variance + float(epsilon) <= 0):
        raise ValueError(
            "Argument `variance` plus `epsilon` must be positive for every "
            f"channel. Received: min(variance)={variance.min()}, epsilon={epsilon}"
        )
    n = mean.shape[0]
    gamma = np.ones(n) if gamma is None else np.asarray(gamma, dtype=np.float64)
    beta = np.zeros(n) if beta is None else np.asarray(beta, dtype=np.float64)
    for name, value in (("gamma", gamma), ("beta", beta)):
        if value.shape != (n,):
            raise ValueError(
                f"Argument `{name}` must have shape ({n},) like `mean`. "
                f"Received: {name}.shape={value.shape}"
            )
    scale = gamma / np.sqrt(variance + float(epsilon))
    return scale, beta - mean * scale


def _out_axis(layout: str, ndim: int) -> int:
    return ndim - 2 if layout == "conv_transpose" else ndim - 1


def fold_weights(
    kernel: ArrayLike,
    bias: ArrayLike | None,
    mean: ArrayLike,
    variance: ArrayLike,
    epsilon: float,
    gamma: ArrayLike | None = None,
    beta: ArrayLike | None = None,
    *,
    layout: str = "dense",
    position: str = "after",
) -> tuple[np.ndarray, np.ndarray]:
    """Fold an inference batch normalization into a linear layer's weights.

    With `position="after"` the batch normalization follows the layer
    (`bn(layer(x))`); with `position="before"` it precedes it
    (`layer(bn(x))`, exact for dense layers and for convolutions without
    padding or groups, which the caller must check). The result is the kernel
    and bias of one layer that computes the same function.

    Args:
        kernel: The layer's kernel (NumPy array), in Keras layout `layout`.
        bias: The layer's bias of shape `(out,)`, or `None` (no bias).
        mean, variance, epsilon, gamma, beta: The batch normalization's
            moving statistics and parameters (`gamma`/`beta` may be `None`).
        layout: One of `"dense"`, `"conv"` (also a separable convolution's
            pointwise kernel), `"conv_transpose"` or `"depthwise"`.
        position: `"after"` or `"before"` (`"before"` needs layout `"dense"`
            or `"conv"`).

    Returns:
        `(kernel, bias)`: new arrays with the dtype of `kernel`; `bias` is
        always an array of shape `(out,)`.

    Example:

    >>> import numpy as np
    >>> k, b = fold_weights(np.ones((2, 3), "float32"), None, np.zeros(3),
    ...                     np.ones(3), 0.0, gamma=np.full(3, 2.0))
    >>> k.dtype.name, k[0].tolist(), b.tolist()
    ('float32', [2.0, 2.0, 2.0], [0.0, 0.0, 0.0])
    """
    if layout not in LAYOUTS:
        raise ValueError(
            f"Argument `layout` must be one of {LAYOUTS}. Received: layout={layout!r}"
        )
    if position not in POSITIONS:
        raise ValueError(
            f"Argument `position` must be one of {POSITIONS}. "
            f"Received: position={position!r}"
        )
    kernel_in = np.asarray(kernel)
    dtype = kernel_in.dtype if kernel_in.dtype.kind == "f" else np.dtype("float32")
    k = kernel_in.astype(np.float64)  # a copy: the input is never mutated
    if k.ndim < 2:
        raise ValueError(
            "Argument `kernel` must have at least 2 dimensions. "
            f"Received: kernel.shape={k.shape}"
        )
    scale, shift = bn_scale_shift(mean, variance, epsilon, gamma, beta)
    c = scale.shape[0]
    if position == "before":
        if layout not in ("dense", "conv"):
            raise ValueError(
                "Folding a batch normalization into the layer that follows it "
                "is exact only for dense and plain convolution kernels. "
                f"Received: layout={layout!r}"
            )
        n_in, n_out = k.shape[-2], k.shape[-1]
        if n_in != c:
            raise ValueError(
                f"The kernel has {n_in} input channels but the statistics have "
                f"{c}. Received: kernel.shape={k.shape}, mean.shape=({c},)"
            )
        b = _bias(bias, n_out)
        b = b + np.einsum("io,i->o", k.reshape(-1, n_in, n_out).sum(0), shift)
        k = k * scale[:, None]  # broadcasts over leading kernel axes
        return k.astype(dtype), b.astype(dtype)
    if layout == "depthwise":
        n_out = k.shape[-2] * k.shape[-1]
        _check_channels(k, n_out, c)
        k = k * scale.reshape(k.shape[-2], k.shape[-1])
    else:
        axis = _out_axis(layout, k.ndim)
        n_out = k.shape[axis]
        _check_channels(k, n_out, c)
        shape = [1] * k.ndim
        shape[axis] = c
        k = k * scale.reshape(shape)
    b = _bias(bias, n_out) * scale + shift
    return k.astype(dtype), b.astype(dtype)


def _check_channels(k, n_out, c) -> None:
    if n_out != c:
        raise ValueError(
            f"The kernel has {n_out} output channels but the statistics have "
            f"{c}. Received: kernel.shape={k.shape}, mean.shape=({c},)"
        )


def _bias(bias, n: int):
    if bias is None:
        return np.zeros(n)
    b = np.asarray(bias, dtype=np.float64)
    if b.shape != (n,):
        raise ValueError(
            f"Argument `bias` must have shape ({n},). Received: bias.shape={b.shape}"
        )
    return b
