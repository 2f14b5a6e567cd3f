"""Training: the loop over Keras `fit`, its callbacks, checkpoints, resuming and stopping.
It knows nothing of sweeps or of Hydra's runtime: what it needs comes in as settings."""
