"""`fold_batchnorm`: a new Keras model with batch normalizations folded away."""

from __future__ import annotations

import keras
import numpy as np

from keras_bn import _keras_graph
from keras_bn._keras_graph import Graph as _Graph

from .affine import ChannelAffine
from .fold_math import bn_scale_shift, fold_weights
from .report import (
    FOLDED_FOLLOWING,
    FOLDED_PRECEDING,
    KEPT,
    UNCHANGED,
    FoldRecord,
    FoldReport,
)

L = keras.layers
_DEPTHWISE = (L.DepthwiseConv1D, L.DepthwiseConv2D)
_SEPARABLE = (L.SeparableConv1D, L.SeparableConv2D)
_TRANSPOSE = (L.Conv1DTranspose, L.Conv2DTranspose, L.Conv3DTranspose)
_CONV = (L.Conv1D, L.Conv2D, L.Conv3D)


def _layout(layer) -> tuple[str, str] | None:
    """(fold_weights layout, kernel weight name) of a foldable layer, or None."""
    # Order matters: check the specific classes before the generic ones.
    if isinstance(layer, _DEPTHWISE):
        return "depthwise", "kernel"
    if isinstance(layer, _SEPARABLE):
        return "conv", "pointwise_kernel"
    if isinstance(layer, _TRANSPOSE):
        return "conv_transpose", "kernel"
    if isinstance(layer, _CONV) or type(layer) is L.Dense:
        return ("dense" if isinstance(layer, L.Dense) else "conv"), "kernel"
    return None


def _channel_axis(layer, rank: int) -> int:
    if isinstance(layer, L.Dense):
        return rank - 1
    return 1 if layer.data_format == "channels_first" else rank - 1


def _special(layer) -> str:
    """Why a layer's kernel is not its plain weight (LoRA, quantized), or ''."""
    if getattr(layer, "lora_enabled", False):
        return "has LoRA enabled (its effective kernel is not a single weight)"
    mode = getattr(getattr(layer, "dtype_policy", None), "quantization_mode", None)
    if mode:
        return f"is quantized ({mode})"
    return ""


def _bn_stats(bn) -> dict:
    as_np = keras.ops.convert_to_numpy
    return {
        "mean": as_np(bn.moving_mean),
        "variance": as_np(bn.moving_variance),
        "epsilon": float(bn.epsilon),
        "gamma": as_np(bn.gamma) if bn.scale else None,
        "beta": as_np(bn.beta) if bn.center else None,
    }


def _why_not_preceding(g: _Graph, bn) -> tuple[str | None, object]:
    bn_nodes = g.layer_nodes[id(bn)]
    producers = []
    for node in bn_nodes:
        tensors = node.input_tensors  # the input first (a mask may follow)
        p = g.producer(tensors[0]) if tensors else None
        if p is None:
            return "no preceding layer", None
        producers.append(p)
    layer = producers[0].operation
    if any(p.operation is not layer for p in producers):
        return "its calls follow different layers", None
    name = f"preceding {layer.name!r}"
    if _layout(layer) is None:
        return f"{name} is a {type(layer).__name__}, not a linear layer", None
    if getattr(layer, "activation", None) is not keras.activations.linear:
        return f"{name} has a fused nonlinear activation", None
    if _special(layer):
        return f"{name} {_special(layer)}", None
    if len(g.layer_nodes[id(layer)]) != len(producers):
        return f"{name} is also called elsewhere", None
    for p, node in zip(producers, bn_nodes, strict=True):
        if len(p.outputs) != 1 or g.only_consumer(p.outputs[0]) is not node:
            return f"the output of {name} also feeds other layers or outputs", None
    rank = len(producers[0].outputs[0].shape)
    if bn.axis % rank != _channel_axis(layer, rank):
        return f"its axis {bn.axis} is not the channel axis of {name}", None
    return None, layer


def _why_not_following(g: _Graph, bn) -> tuple[str | None, object]:
    bn_nodes = g.layer_nodes[id(bn)]
    followers = []
    for node in bn_nodes:
        f = g.only_consumer(node.outputs[0])
        if f is None:
            return "its output feeds several layers or is a model output", None
        followers.append(f)
    layer = followers[0].operation
    name = f"following {layer.name!r}"
    if any(f.operation is not layer for f in followers):
        return "its calls feed different layers", None
    if len(g.layer_nodes[id(layer)]) != len(followers):
        return f"{name} is also called on other inputs", None
    for f, node in zip(followers, bn_nodes, strict=True):
        if len(f.input_tensors) != 1 or f.input_tensors[0] is not node.outputs[0]:
            return f"{name} takes other inputs too", None
    layout = _layout(layer)
    if layout is None or layout[0] not in ("dense", "conv") or layout[1] != "kernel":
        return f"{name} is a {type(layer).__name__}, not a dense or plain conv", None
    if _special(layer):
        return f"{name} {_special(layer)}", None
    rank = len(bn_nodes[0].outputs[0].shape)
    if bn.axis % rank != _channel_axis(layer, rank):
        return f"its axis {bn.axis} is not the input channel axis of {name}", None
    if layout[0] == "conv":
        if layer.padding != "valid":
            return f"{name} pads its input (padding={layer.padding!r})", None
        if getattr(layer, "groups", 1) != 1:
            return f"{name} is a grouped convolution", None
    return None, layer


def _clone(layer, **overrides):
    config = {**layer.get_config(), **overrides}
    return layer.__class__.from_config(config)


def _fold_model(model, prefix: str, cache: dict):
    g = _Graph(model)
    report = FoldReport()
    state = {}  # id(layer) -> {weight name: np.ndarray}
    replacement = {}  # id(old operation) -> new operation, or None (identity)
    assign = []  # (new layer, {weight name: value})
    inside = []  # (layer, its copy) holding batch normalizations

    def weights_of(layer):
        if id(layer) not in state:
            state[id(layer)] = {
                v.name: keras.ops.convert_to_numpy(v) for v in layer.weights
            }
        return state[id(layer)]

    for op in g.operations:
        if not isinstance(op, L.BatchNormalization):
            continue
        path = prefix + op.name
        stats = _bn_stats(op)
        why, folded = {}, False
        for position, action, why_not in (
            ("after", FOLDED_PRECEDING, _why_not_preceding),
            ("before", FOLDED_FOLLOWING, _why_not_following),
        ):
            why[position], target = why_not(g, op)
            if why[position] is None:
                layout, kname = _layout(target)
                w = weights_of(target)
                w[kname], w["bias"] = fold_weights(
                    w[kname], w.get("bias"), **stats, layout=layout, position=position
                )
                replacement[id(op)] = None
                report.records.append(FoldRecord(path, action, target.name))
                folded = True
                break
        if folded:
            continue
        why_p, why_f = why["after"], why["before"]
        affine = ChannelAffine(axis=op.axis, name=op.name, dtype=op.dtype_policy)
        scale, shift = bn_scale_shift(**stats)
        replacement[id(op)] = affine
        assign.append((affine, {"scale": scale, "shift": shift}))
        reason = f"not into preceding: {why_p}; not into following: {why_f}"
        report.records.append(FoldRecord(path, KEPT, None, reason))

    for op in g.operations:
        if id(op) in replacement:
            continue
        if isinstance(op, keras.Model) and _keras_graph.is_graph_model(op):
            if id(op) not in cache:
                cache[id(op)] = _fold_model(op, f"{prefix}{op.name}/", cache)
            new, sub = cache[id(op)]
            report.records.extend(sub.records)
            replacement[id(op)] = new
        elif isinstance(op, keras.layers.Wrapper) and _hidden_bns(op):
            new, values, records = _fold_wrapper(op, prefix, cache)
            report.records.extend(records)
            assign.append((new, values))
            replacement[id(op)] = new
        elif isinstance(op, keras.layers.Layer):
            if id(op) in state:
                new = _clone(op, use_bias=True)
                assign.append((new, state[id(op)]))
            else:
                new = _clone(op)
                assign.append((new, op))
            if _hidden_bns(op):
                inside.append((op, new))
            replacement[id(op)] = new
        else:  # a stateless keras.ops operation
            replacement[id(op)] = op

    new_model = g.rebuild(model, replacement)
    for new, values in assign:
        if isinstance(values, keras.layers.Layer):
            new.set_weights(values.get_weights())
            continue
        for v in new.weights:
            v.assign(np.asarray(values[v.name]).astype(v.dtype))
    for op, new in inside:
        report.records.extend(_fold_inside(new, f"{prefix}{op.name}/", cache))
    return new_model, report


def _fold_inside(layer, prefix: str, cache: dict) -> list:
    """Folds the batch normalizations held by a custom layer's copy in place.

    The layer's `call` cannot be rewritten, but what it holds can be swapped:
    a Sequential or Functional sublayer is replaced by its folded copy, and a
    batch normalization held directly by a ChannelAffine with its scale and
    shift. A batch normalization the layer holds in no attribute, list or
    dict is left unchanged and reported.
    """
    records = []
    owners = _keras_graph.holders(layer)
    done = set()
    for child in _keras_graph.sublayers(layer):
        if id(child) in done:
            continue
        if isinstance(child, keras.Model) and _keras_graph.is_graph_model(child):
            done.update(map(id, _keras_graph.sublayers(child)))
            if not _hidden_bns(child):
                continue
            if id(child) not in cache:
                cache[id(child)] = _fold_model(child, f"{prefix}{child.name}/", cache)
            folded, sub = cache[id(child)]
            if all(
                _keras_graph.replace_sublayer(p, child, folded)
                for p in owners[id(child)]
            ):
                records.extend(sub.records)
                continue
            reason = (
                f"inside {child.name!r}, which {layer.name!r} holds in no attribute"
            )
            records.extend(
                FoldRecord(r.name, UNCHANGED, None, reason) for r in sub.records
            )
        elif isinstance(child, L.BatchNormalization):
            affine = ChannelAffine(
                axis=child.axis, name=child.name, dtype=child.dtype_policy
            )
            affine.build_from_config(child.get_build_config())
            scale, shift = bn_scale_shift(**_bn_stats(child))
            affine.scale.assign(scale.astype(affine.scale.dtype))
            affine.shift.assign(shift.astype(affine.shift.dtype))
            path = prefix + child.name
            if all(
                _keras_graph.replace_sublayer(p, child, affine)
                for p in owners[id(child)]
            ):
                reason = (
                    f"held by {type(layer).__name__} {layer.name!r}, whose call "
                    "cannot be rewritten: one multiply-add per channel"
                )
                records.append(FoldRecord(path, KEPT, None, reason))
            else:
                reason = (
                    f"held by {type(layer).__name__} {layer.name!r} in no "
                    "attribute, list or dict that can be rewritten"
                )
                records.append(FoldRecord(path, UNCHANGED, None, reason))
    return records


def _unused_bns(model) -> list:
    """Batch normalizations `model` tracks that no graph operation uses."""
    used = set()
    for op in _keras_graph.graph_operations(model):
        if isinstance(op, keras.layers.Layer):
            used.add(id(op))
            used.update(map(id, _keras_graph.sublayers(op)))
    return [bn for bn in _hidden_bns(model) if id(bn) not in used]


def _hidden_bns(layer) -> list:
    """The batch normalizations inside `layer` (not `layer` itself)."""
    inner = _keras_graph.sublayers(layer)
    return [s for s in inner if isinstance(s, L.BatchNormalization)]


def _fold_wrapper(wrapper, prefix: str, cache: dict):
    """(new wrapper, its weights, records) for a wrapper holding batch norms.

    `TimeDistributed(BatchNormalization())` becomes
    `TimeDistributed(ChannelAffine())`; a wrapped Sequential or Functional
    model is folded recursively; anything else is left unchanged, reported.
    """
    inner = getattr(wrapper, "layer", None)
    path = f"{prefix}{wrapper.name}/"
    config = wrapper.get_config()
    if isinstance(inner, L.BatchNormalization) and "backward_layer" not in config:
        stats = _bn_stats(inner)
        scale, shift = bn_scale_shift(**stats)
        affine = ChannelAffine(
            axis=inner.axis, name=inner.name, dtype=inner.dtype_policy
        )
        config["layer"] = keras.saving.serialize_keras_object(affine)
        reason = f"wrapped in {type(wrapper).__name__}: one multiply-add per channel"
        record = FoldRecord(path + inner.name, KEPT, None, reason)
        new = wrapper.__class__.from_config(config)
        return new, {"scale": scale, "shift": shift}, [record]
    if (
        isinstance(inner, keras.Model)
        and _keras_graph.is_graph_model(inner)
        and "backward_layer" not in config
    ):
        folded, sub = _fold_model(inner, path, cache)
        config["layer"] = keras.saving.serialize_keras_object(folded)
        new = wrapper.__class__.from_config(config)
        return new, folded, sub.records
    reason = f"inside {type(wrapper).__name__} {wrapper.name!r} (not foldable there)"
    records = [
        FoldRecord(path + bn.name, UNCHANGED, None, reason)
        for bn in _hidden_bns(wrapper)
    ]
    return _clone(wrapper), wrapper, records


def fold_batchnorm(model: keras.Model) -> tuple[keras.Model, FoldReport]:
    """Folds every inference batch normalization of a Keras model away.

    Returns a new model (the input model is left unchanged) that computes the
    same function in inference, in which each `BatchNormalization` (Keras's or
    `keras_bn`'s, renorm included: inference uses `moving_mean`,
    `moving_variance`, `epsilon`, `gamma` and `beta`) is

    1. folded into the preceding `Dense`, `Conv1D/2D/3D`, `DepthwiseConv1D/2D`,
       `SeparableConv1D/2D` (pointwise kernel) or `Conv1D/2D/3DTranspose`, when
       that layer has a linear activation and its output feeds only the batch
       normalization;
    2. otherwise folded into the following `Dense`, or a following plain
       convolution with `padding="valid"` and `groups=1`, when the batch
       normalization's output feeds only it;
    3. otherwise replaced by a `ChannelAffine` layer (one multiply and add).

    Inside a custom layer (whose `call` cannot be rewritten) the batch
    normalizations its copy holds as attributes (directly or in lists and
    dicts) become `ChannelAffine` layers, and a Sequential or Functional model
    it holds is folded as above. A batch normalization the model tracks but
    never uses is dropped and reported as left unchanged.

    Works on Sequential and Functional models, nested models (folded
    recursively), shared layers and multi-input/multi-output graphs.

    Args:
        model: A built `keras.Sequential` or Functional `keras.Model`.

    Returns:
        `(folded_model, report)`: the new model and a `FoldReport` listing every
        batch normalization, what it was folded into, or why it was kept.

    Example:

    >>> import keras
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3),
    ...                           keras.layers.BatchNormalization()])
    >>> folded, report = fold_batchnorm(model)
    >>> [type(layer).__name__ for layer in folded.layers], report.num_folded
    (['Dense'], 1)
    """
    if not isinstance(model, keras.Model):
        raise TypeError(
            "Argument `model` must be a keras.Model. "
            f"Received: model={type(model).__name__}"
        )
    if not _keras_graph.is_graph_model(model):
        raise TypeError(
            f"fold_batchnorm needs a model with a graph (Sequential or Functional), "
            f"but {model.name!r} is a subclassed {type(model).__name__} whose "
            "`call` cannot be inspected. Rebuild it with the Functional API "
            "(keras.Model(inputs, outputs)), or fold its weights yourself with "
            "converters.fold_weights."
        )
    folded, report = _fold_model(model, "", {})
    for bn in _unused_bns(model):
        reason = "tracked by the model but used by none of its layers: dropped"
        report.records.append(FoldRecord(bn.name, UNCHANGED, None, reason))
    return folded, report
