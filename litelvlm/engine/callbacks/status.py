"""Say in the run folder whether the run ended well: `status.json` (`litelvlm.engine.runs`)."""

from __future__ import annotations

from pathlib import Path

import lightning as L

from litelvlm.engine.runs import COMPLETE, FAILED, RUNNING, write_status


class RunStatus(L.Callback):
    """`running` at setup, `complete` after the last hook, `failed` with the error when one stops the run.

    Only runs with a logger have a run folder; without one nothing is written.
    """

    def __init__(self) -> None:
        self.folder: Path | None = None
        self.stage: str | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.folder, self.stage = None, stage
        if not trainer.loggers:
            return
        folder = Path(trainer.log_dir)  # broadcasts under DDP: every rank asks
        if trainer.is_global_zero:
            self.folder = folder
            write_status(folder, RUNNING, stage=stage)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Lightning calls the teardown hooks only after a run that raised nothing (after on_fit_end's export).
        if self.folder is not None:
            write_status(self.folder, COMPLETE, stage=stage)
        self.folder = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self.folder is not None:
            error = f"{type(exception).__name__}: {exception}".splitlines()[0] if str(exception) else type(exception).__name__
            write_status(self.folder, FAILED, stage=self.stage, error=error)
        self.folder = None
