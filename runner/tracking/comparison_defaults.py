"""What a comparison of runs shows unless told otherwise, apart from `runner.tracking.comparison`
that computes it: `runner-compare --help` names these without loading pandas or MLflow."""

DEFAULT_METRICS = ("test/accuracy", "val/accuracy", "test/loss", "val/loss")
DEFAULT_SORT = "val/accuracy"
# The metric --plot draws, each run's curve.
CURVE = "val/accuracy"
# The forms the table is written in, the first by default.
FORMATS = ("table", "markdown", "csv")
