"""A SLURM job preempted, requeued or near its time limit: checkpointed, requeued, carried on.

SLURM warns a job with SIGUSR2 (submitit's `--signal=USR2@signal_delay_s`) before its time
limit, and before a preemption where the cluster says so (`PreemptParameters=send_user_signal`);
it stops a job it requeues (`scontrol requeue`, or a preemption without that setting) or cancels
with SIGTERM. On either, the runner stops training at the end of the execution under way (its
device.steps_per_execution steps), writes a checkpoint and ends the MLflow run KILLED
(runner.training.stopping.Stops). SIGUSR2 is then handed to submitit's own handler, which calls
the launcher's `checkpoint` (resubmit the same job) and requeues it. The requeued job runs the
same command again; seeing `SLURM_RESTART_COUNT`, it carries on from the checkpoint in the same
MLflow run, as `trainer.resume=true` would: a job stopped after its last step is only tested
and its run ended.
"""

import os

from runner.config.schema import Resume


def requeued() -> bool:
    """Whether this is a SLURM job started again after a requeue."""
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0


def resume_as(configured: Resume, has_checkpoint: bool) -> Resume:
    """`trainer.resume` for this job: `true` in a requeued job whose earlier start wrote a
    checkpoint (`has_checkpoint`), as configured otherwise."""
    if configured == Resume.false and requeued() and has_checkpoint:
        return Resume.true
    return configured


def will_requeue() -> bool:
    """Whether submitit runs this SLURM job, and so requeues it on SLURM's notice."""
    return "SLURM_JOB_ID" in os.environ and "SUBMITIT_FOLDER" in os.environ
