"""Where a run's scalars go, on the logging rank: TensorBoard (--tensorboard-dir) and Weights & Biases
(--wandb-project, --wandb-exp-name, --wandb-save-dir: Megatron-LM's flags and defaults; the whole `RunConfig` is the
W&B run's config). Both get the same scalars at the same step (the iteration)."""

from __future__ import annotations

import dataclasses
import os

from megatron_scope.config import RunConfig


class ScalarWriters:
    """TensorBoard's SummaryWriter and a W&B run, each where the run's config asks for it."""

    def __init__(self, config: RunConfig):
        loop = config.loop
        self._tensorboard = self._wandb = None
        if loop.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(loop.tensorboard_dir)
        if loop.wandb_project:
            import wandb

            save_dir = loop.wandb_save_dir or os.path.join(loop.save, "wandb")
            os.makedirs(save_dir, exist_ok=True)
            self._wandb = wandb.init(project=loop.wandb_project, name=loop.wandb_exp_name, dir=save_dir,
                                     config=dataclasses.asdict(config))

    def add_scalars(self, scalars: dict[str, float], step: int) -> None:
        if self._tensorboard is not None:
            for key, value in scalars.items():
                self._tensorboard.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def flush(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.flush()

    def close(self) -> None:
        """Flush and close both (the W&B run finishes); idempotent."""
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
