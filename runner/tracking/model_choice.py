"""Which logged model a command names: a training run's id or a model URI, exactly one.

Apart from `runner.tracking.logged_model`, which loads MLflow, so that `runner-eval` and
`runner-predict` refuse a wrong command line at once rather than after seconds of loading."""

from runner.errors import UserError


def check_choice(run_id: str | None, model_uri: str | None) -> None:
    """Exactly one of `run_id` and `model_uri` names the model."""
    if bool(run_id) == bool(model_uri):
        raise UserError("give exactly one of run_id=<MLflow run id> or model_uri=<model URI>")
