"""`runner-eval`: a logged model's loss and accuracy on the MNIST test set, like the TF Layers
guide's `evaluate()`. Usage: `uv run runner-eval run_id=<run id>` or `model_uri=models:/<id>`."""

import hydra
from omegaconf import DictConfig

from runner.config import register_configs
from runner.errors import UserError
from runner.train import CONF_DIR

register_configs()


def evaluate(cfg: DictConfig) -> dict[str, float | int | None]:
    from runner.tensorflow_logs import load_tensorflow

    load_tensorflow()  # before anything else imports it
    from runner import data, logged_model
    from runner.fitting import evaluate_outputs

    found = logged_model.load(cfg.run_id, cfg.model_uri, cfg.tracking_uri)
    test = data.load_test(cfg.data)
    outputs, loss = evaluate_outputs(found.model, test, cfg.data.eval_batch_size)
    steps = found.run.data.params.get("trainer.steps") if found.run else None
    return {
        "loss": loss,
        "accuracy": float((outputs.argmax(axis=1) == test.y).mean()),
        "global_step": int(steps) if steps else None,
    }


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="evaluate")
def main(cfg: DictConfig) -> None:
    try:
        print(evaluate(cfg))
    except UserError as error:
        raise SystemExit(f"runner-eval: error: {error}") from None
