"""Adam whose update is TensorFlow's fused `ResourceApplyAdam` kernel.

Keras 3 writes Adam's update as about ten element-wise ops per variable, each a pass over the
weights; on the CPU that pass count made the raw-ops CNN's 3.2M-weight `fc1` layer a large part
of a step (docs/performance.md). The fused kernel, the one TF1's `AdamOptimizer` (and so the
tutorial) ran, makes one pass with the same formula. Under a `tf.distribute` strategy, with
`amsgrad`, and on any other backend (where XLA fuses the element-wise ops itself), Keras's own
update runs instead.
"""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="runner")
class FusedAdam(keras.optimizers.Adam):
    def update_step(self, gradient, variable, learning_rate):
        if keras.backend.backend() != "tensorflow":
            return super().update_step(gradient, variable, learning_rate)
        import tensorflow as tf

        if self.amsgrad or tf.distribute.has_strategy():
            return super().update_step(gradient, variable, learning_rate)
        dtype = variable.dtype
        step = ops.cast(self.iterations + 1, dtype)
        index = self._get_variable_index(variable)
        beta_1, beta_2 = ops.cast(self.beta_1, dtype), ops.cast(self.beta_2, dtype)
        tf.raw_ops.ResourceApplyAdam(
            var=variable.handle,
            m=self._momentums[index].handle,
            v=self._velocities[index].handle,
            beta1_power=ops.power(beta_1, step),
            beta2_power=ops.power(beta_2, step),
            lr=ops.cast(learning_rate, dtype),
            beta1=beta_1,
            beta2=beta_2,
            epsilon=ops.cast(self.epsilon, dtype),
            grad=ops.cast(gradient, dtype),
        )
