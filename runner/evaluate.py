"""`runner-eval`: a logged model's loss and accuracy on the MNIST test set, like the TF Layers
guide's `evaluate()`. Usage: `uv run runner-eval run_id=<run id>` or `model_uri=models:/<id>`."""

import hydra
from omegaconf import DictConfig

from runner.config import register_configs
from runner.errors import reported, run_hydra_app
from runner.train import CONF_DIR

register_configs()


def evaluate(cfg: DictConfig) -> dict[str, float | int | None]:
    """Loss, accuracy and the optimizer step the model reached. The command line and the store
    are checked before TensorFlow loads, which takes seconds."""
    from runner import logged_model

    logged_model.check_choice(cfg.run_id, cfg.model_uri)
    from runner import tracking

    tracking.connect(cfg.tracking_uri)
    from runner.tensorflow_logs import load_tensorflow

    load_tensorflow()  # before anything else imports it
    from runner import data
    from runner.fitting import evaluate_outputs

    found = logged_model.load(cfg.run_id, cfg.model_uri)
    test = data.load_test(cfg.data)
    outputs, loss = evaluate_outputs(found.model, test, cfg.data.eval_batch_size)
    return {
        "loss": loss,
        "accuracy": float((outputs.argmax(axis=1) == test.y).mean()),
        "global_step": logged_model.reached_step(found),
    }


def main() -> None:
    """The `runner-eval` command."""
    run_hydra_app("runner-eval", run_hydra)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="evaluate")
def run_hydra(cfg: DictConfig) -> None:
    with reported("runner-eval"):
        print(evaluate(cfg))
