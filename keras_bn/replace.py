"""Swap Keras's built-in BatchNormalization layers for keras_bn's."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import warnings

import keras

from keras_bn import _keras_graph
from keras_bn.batch_normalization import BatchNormalization

# Wrappers whose config holds the wrapped layer(s) under these keys.
_WRAPPED_KEYS = ("layer", "backward_layer")
# Keras's class, kept here: `_constructing_with` swaps the public name.
_KERAS_BN = keras.layers.BatchNormalization
# How a keras_bn BN is serialized (`keras.saving.serialize_keras_object`).
_OURS = {
    "module": BatchNormalization.__module__,
    "class_name": BatchNormalization.__name__,
    "registered_name": keras.saving.get_registered_name(BatchNormalization),
}

#: How the copy was made (`ReplaceReport.route`).
CONFIG_ROUTE = "config"
CLONE_ROUTE = "clone"


@dataclasses.dataclass
class ReplaceReport:
    """What `replace_batchnorm` did.

    Attributes:
        route: `"config"`: the copy was rebuilt from the model's own config by
            its own class (a keras_hub `Backbone` stays that `Backbone`);
            `"clone"`: layer by layer with `keras.models.clone_model` (the
            copy is a plain Sequential or Functional model), used where the
            config cannot be deserialized (e.g. an unregistered custom layer).
        why_clone: Why the config route could not be used (`""` if it was).
        swapped: How many batch normalizations were swapped.
        kept: `(layer path, reason)` of each one that could not be swapped.
    """

    route: str
    why_clone: str = ""
    swapped: int = 0
    kept: list = dataclasses.field(default_factory=list)


def replace_batchnorm(model: keras.Model, *, return_report: bool = False):
    """Returns a copy of `model` with every built-in BN replaced by ours.

    Works on Sequential and Functional models, subclasses of them (such as
    keras_hub's backbones and tasks), with `keras.ops` nodes, nested models,
    shared layers, BN wrapped in `TimeDistributed` or `Bidirectional` (or any
    `keras.layers.Wrapper`), and BNs held by custom layers as attributes
    (directly or in nested lists, tuples and dicts).

    The copy is rebuilt by the model's own class from its config, so it keeps
    its class and API (a keras_hub `Backbone` keeps `pyramid_outputs` and the
    presets API, a `Task` its backbone and preprocessor); where the config
    cannot be deserialized, it is cloned layer by layer into a plain
    Sequential or Functional model. Every layer of the copy is new; the
    weights (trainable and moving statistics) are copied in order, so the copy
    computes the same function and `copy.weights` lines up one to one with
    `model.weights`. `model` is untouched. A BN that cannot be reached (for
    example one created inside `call`) stays Keras's, with a `UserWarning`
    saying why.

    A model whose class builds its BNs in its constructor (a keras_hub
    `Backbone`) is saved with its constructor arguments, not its layers: it
    reloads with Keras's BN (same weights and outputs). Load it inside
    `keras_bn.replace.batchnorm_scope()` to get keras_bn's again.

    Args:
        model: A built Sequential or Functional `keras.Model` (or subclass).
        return_report: Also return a `ReplaceReport`.

    Returns:
        The new model, or `(model, report)` with `return_report=True`.

    Example:

    >>> import keras
    >>> inp = keras.Input((8,))
    >>> x = keras.layers.BatchNormalization()(keras.layers.Dense(4)(inp))
    >>> new = replace_batchnorm(keras.Model(inp, x + 3.0))
    >>> [type(layer).__module__.split(".")[0] for layer in new.layers[1:3]]
    ['keras', 'keras_bn']
    """
    copy, report = _swap(model, to_keras_bn=True)
    return (copy, report) if return_report else copy


def to_keras_batchnorm(model: keras.Model, *, return_report: bool = False):
    """The inverse of `replace_batchnorm`: keras_bn's BNs become Keras's.

    Used to build the baseline a keras_bn model is compared against (the
    same architecture and weights with Keras's own layer). Options Keras's
    layer lacks (ghost batches, unbiased variance) only change training.
    """
    copy, report = _swap(model, to_keras_bn=False)
    return (copy, report) if return_report else copy


@contextlib.contextmanager
def batchnorm_scope():
    """Models built inside get keras_bn's BN wherever they ask for Keras's.

    Inside the block, `keras.layers.BatchNormalization` is keras_bn's class,
    so a model class that builds its layers in its constructor (a keras_hub
    `Backbone`, `from_preset`, `keras.saving.load_model` of such a model)
    builds keras_bn's BNs. Not thread-safe: other threads building models at
    the same time see the swap too.

    Example:

    >>> import keras
    >>> with batchnorm_scope():
    ...     layer = keras.layers.BatchNormalization()
    >>> type(layer).__module__
    'keras_bn.batch_normalization'
    """
    with _constructing_with(BatchNormalization):
        yield


@contextlib.contextmanager
def _constructing_with(cls):
    saved = keras.layers.BatchNormalization
    keras.layers.BatchNormalization = cls
    try:
        yield
    finally:
        keras.layers.BatchNormalization = saved


def _swap(model, to_keras_bn: bool, warn: bool = True):
    if not isinstance(model, keras.Model) or not _keras_graph.is_graph_model(model):
        raise TypeError(
            "Argument `model` must be a Sequential or Functional keras.Model "
            "(a subclassed model has no graph to rewrite: build it with "
            "keras_bn.BatchNormalization directly). "
            f"Received: {type(model).__name__}"
        )
    if not model.built:
        raise ValueError(
            f"Argument `model` ({model.name!r}) is not built; call it on data or "
            "give it an Input first, so its weights exist to be copied."
        )
    target = BatchNormalization if to_keras_bn else _KERAS_BN
    try:
        copy = _from_config(model, to_keras_bn)
        report = ReplaceReport(CONFIG_ROUTE)
    except Exception as e:  # noqa: BLE001 - any failure: the clone route
        first = (str(e).strip().splitlines() or [""])[0][:200]
        report = ReplaceReport(CLONE_ROUTE, f"{type(e).__name__}: {first}")
        copy = _clone(model, to_keras_bn)
    _swap_held(copy, to_keras_bn, report)
    report.swapped = sum(
        type(la) is target for la in _keras_graph.sublayers(copy)
    ) - sum(type(la) is target for la in _keras_graph.sublayers(model))
    if report.kept and warn:
        listed = "; ".join(f"{path}: {why}" for path, why in report.kept)
        warnings.warn(
            f"{len(report.kept)} BatchNormalization layer(s) of {model.name!r} "
            f"could not be replaced and stay as they are: {listed}",
            stacklevel=3,
        )
    return copy, report


def _from_config(model, to_keras_bn: bool):
    """The copy rebuilt by the model's own class, weights copied in order."""
    config = _rewrite(keras.saving.serialize_keras_object(model), to_keras_bn)
    with (
        _constructing_with(BatchNormalization if to_keras_bn else _KERAS_BN),
        warnings.catch_warnings(),
    ):
        # The copy is not compiled (as with clone_model): not news to the user.
        warnings.filterwarnings("ignore", message=r"`compile\(\)` was not called")
        copy = keras.saving.deserialize_keras_object(config)
    if not isinstance(copy, type(model)) or not copy.built:
        raise TypeError(f"the config rebuilds a {type(copy).__name__}")
    old, new = model.weights, copy.weights
    if len(old) != len(new) or any(
        a.shape != b.shape or a.name != b.name for a, b in zip(old, new, strict=True)
    ):
        raise ValueError("the rebuilt model's weights do not line up")
    copy.set_weights(model.get_weights())
    return copy


def _rewrite(config, to_keras_bn: bool):
    """`config` with each serialized source BN made a target BN."""
    if isinstance(config, list):
        return [_rewrite(c, to_keras_bn) for c in config]
    if not isinstance(config, dict):
        return config
    out = {k: _rewrite(v, to_keras_bn) for k, v in config.items()}
    if to_keras_bn and (
        out.get("class_name") == "BatchNormalization"
        and out.get("module") == "keras.layers"
    ):
        out.update(_OURS)
    elif not to_keras_bn and out.get("registered_name") == _OURS["registered_name"]:
        out.update(module="keras.layers", registered_name=None)
        out["config"] = _keras_bn_config(out["config"])
    return out


def _clone(model, to_keras_bn: bool):
    """The clone route: a plain Sequential/Functional copy, layer by layer."""
    pairs = []

    def clone(layer):
        if not isinstance(layer, keras.layers.Layer):
            return layer  # a stateless keras.ops operation: reuse it
        new = _clone_layer(layer, to_keras_bn)
        pairs.append((layer, new))
        return new

    with _constructing_with(BatchNormalization if to_keras_bn else _KERAS_BN):
        copy = keras.models.clone_model(model, clone_function=clone, recursive=True)
    for old, new in pairs:
        if old.weights:
            new.set_weights(old.get_weights())
    return copy


def _swap_held(model, to_keras_bn: bool, report: ReplaceReport) -> None:
    """Swaps the source BNs left in `model` (built, weights set) in place."""
    # A Sequential or Functional model held by a custom layer: swap its copy.
    owners = _keras_graph.holders(model)
    for layer in _keras_graph.sublayers(model):
        parents = owners[id(layer)]
        if (
            _keras_graph.is_graph_model(layer)
            and parents
            and not any(_keras_graph.is_graph_model(p) for p in parents)
            and any(_source(la, to_keras_bn) for la in _keras_graph.sublayers(layer))
        ):
            new = _swap(layer, to_keras_bn, warn=False)[0]
            for p in parents:
                _keras_graph.replace_sublayer(p, layer, new)
    graph_ops = set()
    for layer in [model, *_keras_graph.sublayers(model)]:
        if _keras_graph.is_graph_model(layer):
            graph_ops.update(map(id, _keras_graph.graph_operations(layer)))
    owners = _keras_graph.holders(model)
    for layer in _keras_graph.sublayers(model):
        if not _source(layer, to_keras_bn):
            continue
        parents = owners[id(layer)]
        path = "/".join(p.name for p in parents[:1]) + "/" + layer.name
        if id(layer) in graph_ops:
            why = "a node of a functional graph the copy could not rebuild"
            report.kept.append((path, why))
            continue
        new = _new_bn(layer, to_keras_bn)
        where = [_keras_graph.replace_sublayer(p, layer, new) for p in parents]
        if not all(where):
            why = (
                "tracked by its layer but held in no attribute, list or dict "
                "(created inside `call`?)"
            )
            report.kept.append((path, why))
    _keras_graph.retrack_torch_params(model)


def _new_bn(layer, to_keras_bn: bool):
    """A built target BN with `layer`'s config, weights and state."""
    config = layer.get_config()
    if to_keras_bn:
        new = BatchNormalization.from_config(config)
    else:
        new = _KERAS_BN.from_config(_keras_bn_config(config))
    if layer.built:
        new.build_from_config(layer.get_build_config())
        new.set_weights(layer.get_weights())
    return new


def _is_keras_bn(layer) -> bool:
    return type(layer) is _KERAS_BN


def _source(layer, to_keras_bn: bool) -> bool:
    """True for a layer the swap replaces."""
    if to_keras_bn:
        return _is_keras_bn(layer)
    return isinstance(layer, BatchNormalization)


def _keras_bn_config(config: dict) -> dict:
    params = inspect.signature(_KERAS_BN.__init__).parameters
    base = ("name", "dtype", "trainable")
    return {k: v for k, v in config.items() if k in params or k in base}


def _clone_layer(layer, to_keras_bn: bool):
    if _source(layer, to_keras_bn):
        if to_keras_bn:
            return BatchNormalization.from_config(layer.get_config())
        config = _keras_bn_config(layer.get_config())
        return _KERAS_BN.from_config(config)
    config = layer.get_config()
    if isinstance(layer, keras.layers.Wrapper):
        for key in _WRAPPED_KEYS:
            inner = getattr(layer, key, None)
            if isinstance(inner, keras.layers.Layer) and key in config:
                new_inner = _replaced(inner, to_keras_bn)
                config[key] = keras.saving.serialize_keras_object(new_inner)
        return layer.__class__.from_config(config)
    return layer.__class__.from_config(config)


def _replaced(layer, to_keras_bn: bool):
    """An unbuilt copy of a wrapped layer with its BNs swapped."""
    if isinstance(layer, keras.Model) and _keras_graph.is_graph_model(layer):
        return _swap(layer, to_keras_bn)[0]
    return _clone_layer(layer, to_keras_bn)
