"""Figures logged with each run: training curves and the test-set confusion matrix.

They are plain `Figure` objects, not pyplot's, so no global registry keeps them alive across
the runs of one process (a sweep worker) and no GUI backend is needed.
"""

import numpy as np
from matplotlib.figure import Figure


def training_curves(history: dict[str, list[tuple[int, float]]]) -> Figure:
    """Loss and accuracy against optimizer step, training and validation on shared axes."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, metric in zip(axes, ("loss", "accuracy"), strict=True):
        for split in ("train", "val"):
            points = history.get(f"{split}/{metric}", [])
            if points:
                steps, values = zip(*points, strict=True)
                ax.plot(steps, values, marker="." if len(points) < 30 else None, label=split)
        ax.set(title=metric, xlabel="step")
        ax.grid(alpha=0.3)
        ax.legend()
    return fig


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, classes: int = 10) -> Figure:
    """Counts of (true, predicted) class pairs, written in each cell."""
    counts = np.bincount(labels * classes + predicted, minlength=classes * classes)
    counts = counts.reshape(classes, classes)
    fig = Figure(figsize=(7, 6), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(counts, cmap="Blues")
    fig.colorbar(image, ax=ax)
    threshold = counts.max() / 2
    for (true, pred), count in np.ndenumerate(counts):
        colour = "white" if count > threshold else "black"
        ax.text(pred, true, str(count), ha="center", va="center", fontsize=7, color=colour)
    accuracy = np.trace(counts) / max(counts.sum(), 1)
    ax.set(
        title=f"Test confusion matrix (accuracy {accuracy:.4f})",
        xlabel="predicted",
        ylabel="true",
        xticks=range(classes),
        yticks=range(classes),
    )
    return fig


def sweep_curves(
    curves: dict[str, list[tuple[int, float]]],
    metric: str,
    spread: dict[str, list[tuple[int, float]]] | None = None,
) -> Figure:
    """One line a run (of a sweep, or of several): `metric` against optimizer step. With
    `spread`, each line is a group of runs' mean, in a band of ±1 standard deviation (`spread`
    of the same name, at the same steps)."""
    fig = Figure(figsize=(9, 5), layout="constrained")
    ax = fig.subplots()
    for name, points in curves.items():
        if points:
            steps, values = zip(*sorted(points), strict=True)
            [line] = ax.plot(steps, values, marker="." if len(points) < 30 else None, label=name)
            if spread is not None:
                mean = np.array(values)
                deviation = np.array([value for _, value in sorted(spread[name])])
                ax.fill_between(
                    steps, mean - deviation, mean + deviation, color=line.get_color(), alpha=0.2
                )
    each = "run" if spread is None else "group of runs: mean ± 1 std"
    ax.set(title=f"{metric} of each {each}", xlabel="step", ylabel=metric)
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize=7, loc="best")
    return fig
