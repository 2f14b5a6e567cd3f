"""One of two processes that train a model together on JAX, through Keras's multi-process
`keras.distribution.initialize` and JAX's CPU collectives (gloo), as docs/performance.md says
("Several processes on JAX"): `python tests/jax_process.py PROCESS_ID PORT`. Prints, as JSON,
the devices it sees, what Keras says of numpy input with the dataset auto-sharded, and the
loss of each epoch trained on its own rows of each global batch. `python tests/jax_process.py
alone` trains the same model on the whole batches in one process, for comparison."""

import json
import os
import sys

os.environ["KERAS_BACKEND"] = "jax"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")

import keras  # noqa: E402
import numpy as np  # noqa: E402

PROCESSES = 2
GLOBAL_BATCH = 100


def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 8)).astype("float32")
    return x, (x @ rng.normal(size=8) > 0).astype("int32")


def model() -> keras.Model:
    keras.utils.set_random_seed(0)
    made = keras.Sequential([keras.Input((8,)), keras.layers.Dense(2)])
    made.compile(
        optimizer=keras.optimizers.SGD(0.5),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return made


def alone() -> None:
    x, y = data()
    history = model().fit(x, y, batch_size=GLOBAL_BATCH, epochs=4, shuffle=False, verbose=0)
    print(json.dumps({"losses": history.history["loss"]}))


def main(process_id: int, port: int) -> None:
    keras.distribution.initialize(f"127.0.0.1:{port}", PROCESSES, process_id)
    distribution = keras.distribution.DataParallel(devices=jax.devices())
    keras.distribution.set_distribution(distribution)
    x, y = data()
    local = GLOBAL_BATCH // PROCESSES
    trained = model()
    try:
        trained.fit(x, y, batch_size=local, epochs=1, verbose=0)
        refused = None
    except ValueError as error:
        refused = str(error)
    # Each global batch of 100 is rows [100 k, 100 k + 100); this process feeds its half.
    mine = np.concatenate(
        [
            np.arange(start + process_id * local, start + (process_id + 1) * local)
            for start in range(0, len(x), GLOBAL_BATCH)
        ]
    )
    distribution.auto_shard_dataset = False
    history = trained.fit(x[mine], y[mine], batch_size=local, epochs=4, shuffle=False, verbose=0)
    print(
        json.dumps(
            {
                "devices": len(jax.devices()),
                "local_devices": len(jax.local_devices()),
                "auto_sharded_numpy": refused,
                "losses": history.history["loss"],
            }
        )
    )


if __name__ == "__main__":
    if sys.argv[1] == "alone":
        alone()
    else:
        main(int(sys.argv[1]), int(sys.argv[2]))
