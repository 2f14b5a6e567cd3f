"""A clean, seeded start for every run, so equal configs give bitwise-equal results."""


def start_clean(seed: int, deterministic: bool, precision: str = "float32") -> None:
    """Forget what earlier runs in this process left behind, set the dtype policy `precision`,
    then seed everything.

    The joblib launcher reuses worker processes between sweep jobs, and Keras and TensorFlow keep
    global state (graph names, dtype policy, seeds, the determinism flag) across them.
    """
    import keras
    import tensorflow as tf

    keras.backend.clear_session()
    keras.config.set_dtype_policy(precision)
    keras.utils.set_random_seed(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()
    else:
        # Not exported by tf.config, but the only way to undo an earlier run's enable call.
        from tensorflow.python.framework import config as tf_config

        tf_config.disable_op_determinism()
