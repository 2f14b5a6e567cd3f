"""A small dataset of your own for the runner, to copy: 12x12 RGB images in 5 classes, each a
coloured square in its own corner (or the centre) over noise.

`uv run python make_npz.py shapes.npz` writes it as an .npz for `data=npz data.path=shapes.npz`;
`data=loader data._target_=make_npz.load` has the runner call `load()` instead."""

import sys

import numpy as np

COLOURS = np.array(
    [[255, 64, 64], [64, 255, 64], [64, 64, 255], [255, 255, 64], [255, 64, 255]], np.uint8
)
CORNERS = [(1, 1), (1, 7), (7, 1), (7, 7), (4, 4)]  # top-left of each class's 4x4 square


def load(train: int = 600, test: int = 200, seed: int = 0) -> tuple[tuple, tuple]:
    """((x_train, y_train), (x_test, y_test)) as keras.datasets returns them: uint8 images of
    shape (N, 12, 12, 3) and uint8 labels 0..4."""
    rng = np.random.default_rng(seed)

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, len(COLOURS), n).astype(np.uint8)
        images = rng.integers(0, 96, (n, 12, 12, 3)).astype(np.uint8)
        for image, label in zip(images, labels, strict=True):
            row, col = CORNERS[label]
            image[row : row + 4, col : col + 4] = COLOURS[label]
        return images, labels

    return split(train), split(test)


def main() -> None:
    """Write `load()`'s arrays to the .npz file named on the command line."""
    if len(sys.argv) != 2:
        sys.exit("usage: python make_npz.py OUT.npz")
    (x_train, y_train), (x_test, y_test) = load()
    np.savez_compressed(sys.argv[1], x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    print(f"{sys.argv[1]}: {len(y_train)} training and {len(y_test)} test images of 5 classes")


if __name__ == "__main__":
    main()
