"""Make Keras 3.15's `Model.fit` run under `tf.distribute.MultiWorkerMirroredStrategy`.

Keras 3 (3.15.1 with TensorFlow 2.21 checked here; keras-team/keras#20585,
tensorflow/tensorflow#72388) cannot `fit` any model, whatever its layers, under
`MultiWorkerMirroredStrategy` (MWMS). Two bugs in
`keras/src/backend/tensorflow/trainer.py`, hit one after the other:

1. `_maybe_symbolic_build` learns the shapes of a batch by averaging the first
   batch over replicas with `strategy.reduce("MEAN", batch, axis=None)`. The
   batch is a tuple `(x, y)` of `PerReplica` values, but `strategy.reduce` takes
   a single value: `MirroredStrategy` gets away with it, MWMS's collective path
   hands the tuple to `tf.convert_to_tensor` and fails with `ValueError: Attempt
   to convert a value (PerReplica:{...}) with an unsupported type`.
2. After every step `reduce_per_replica` averages each logged metric with
   `strategy.reduce("MEAN", value, axis=0)` whenever the strategy is in
   multi-worker mode (`reduction="auto"` is hard-coded in `_make_function`;
   the `distribute_reduction_method` property is never read). The logged
   values are scalars: `ValueError: Invalid reduction dimension 0 for input
   with 0 dimensions`.

`MultiWorkerFit`, mixed into a Keras model class, works around both: it builds
the model from this worker's own first batch (only the shapes are used), and
its `train_step`/`test_step` return each logged value with shape `(1,)`, so
that Keras's axis-0 mean is the mean over workers (each worker's metric
variables are its own: Keras creates them `on_read`). Under any other strategy
it changes nothing. The first fix overrides a private method of Keras's
TensorFlow trainer, the second the public `train_step`/`test_step`;
tests/test_multiworker.py checks that Keras still fails without each of them
(so that they can be dropped when Keras is fixed) and that `fit` with them
equals one process on the global batch.

    class Sequential(MultiWorkerFit, keras.Sequential):
        pass

    with strategy.scope():
        model = Sequential([...])
        model.compile(...)
    model.fit(dataset)   # a tf.data.Dataset of global batches
"""

from __future__ import annotations


def _is_multi_worker(strategy) -> bool:
    import tensorflow as tf

    return (
        isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
        and strategy.extended._in_multi_worker_mode()
    )


class MultiWorkerFit:
    """Mixin for a Keras model class (TensorFlow backend); see the module doc."""

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        strategy = self.distribute_strategy
        if iterator is not None and _is_multi_worker(strategy):
            import tensorflow as tf

            for _, _, it in iterator:  # As Keras does: the first batch.
                batch = next(it)
                break
            data_batch = tf.nest.map_structure(
                lambda v: strategy.experimental_local_results(v)[0], batch
            )
            iterator = None
        return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    def train_step(self, data):
        return self._rank1_logs(super().train_step(data))

    def test_step(self, data):
        return self._rank1_logs(super().test_step(data))

    def _rank1_logs(self, logs):
        if not _is_multi_worker(self.distribute_strategy):
            return logs
        import tensorflow as tf

        return tf.nest.map_structure(lambda v: tf.reshape(v, [1]), logs)
