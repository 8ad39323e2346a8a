"""Say in the run folder whether the run ended well: `status.json` (`litelvlm.engine.runs`)."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

from litelvlm.engine.runs import COMPLETE, FAILED, INTERRUPTED, RUNNING, resume_command, write_status


RESUMABLE_STAGES = ("validate", "test")  # the stages `--resume RUN_DIR` continues from their records


class RunStatus(L.Callback):
    """`running` at setup, `complete` after the last hook, `failed` with the error when one stops the run,
    `interrupted` with the resume command when a SIGTERM (a scheduler's notice before its kill) does.

    Lightning's own SIGTERM handler sets `trainer.received_sigterm` and its loop raises
    `SIGTERMException` after the batch in progress, except after a loader's last batch; this callback
    raises it there too, so every process stops at its next batch end, its records written (it runs
    after `SampleRecords`); under DDP it notes the first SIGTERM without Lightning's in-handler broadcast (`_handle_sigterm_once`). Only runs with a logger have a run folder; without one nothing is written.

    Args:
        command: the CLI's arguments, for the resume command an interrupted run prints (None: not printed).
    """

    def __init__(self, command: list[str] | None = None) -> None:
        self.command = command
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

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _handle_sigterm_once(trainer)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _handle_sigterm_once(trainer)

    def _stop_on_sigterm(self, trainer: L.Trainer) -> None:
        if trainer.received_sigterm:
            raise SIGTERMException

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._stop_on_sigterm(trainer)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._stop_on_sigterm(trainer)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Lightning calls the teardown hooks only after a run that raised nothing (after on_fit_end's export).
        if self.folder is not None:
            write_status(self.folder, COMPLETE, stage=stage)
        self.folder = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self.folder is not None and (isinstance(exception, SIGTERMException) or trainer.received_sigterm):
            resumable = self.command is not None and self.stage in RESUMABLE_STAGES  # a fit resumes from its checkpoints
            resume = resume_command(self.command, self.folder) if resumable else None
            write_status(self.folder, INTERRUPTED, stage=self.stage, signal="SIGTERM", resume=resume)
            print(f"litelvlm: interrupted by SIGTERM; the records of every finished batch are in {self.folder / 'records'}", file=sys.stderr)
            if resume is not None:
                print(f"litelvlm: resume with: {resume}", file=sys.stderr)
        elif self.folder is not None:
            error = f"{type(exception).__name__}: {exception}".splitlines()[0] if str(exception) else type(exception).__name__
            write_status(self.folder, FAILED, stage=self.stage, error=error)
        self.folder = None


def _handle_sigterm_once(trainer: L.Trainer) -> None:
    """Under DDP, replace Lightning's SIGTERM handler (installed for this run, restored by Lightning
    after it) by one without its collective. Lightning's broadcasts from rank 0 INSIDE the handler,
    once per signal; Python runs a handler only between bytecodes, so a rank busy in a long torch op
    handles the signal late and finds rank 0 already gone ("Connection closed by peer"), and a rank
    signalled twice (by the scheduler, and forwarded by Lightning's launcher) waits on a second
    broadcast that rank 0 never sends. Every rank gets the signal itself (srun and scancel signal
    every task; torchrun's agent and Lightning's launcher forward it), so each only notes it, and
    forwards it once as Lightning does; every rank then stops at its next batch end."""
    if trainer.world_size == 1 or threading.current_thread() is not threading.main_thread():
        return
    if not callable(signal.getsignal(signal.SIGTERM)):
        return
    connector = trainer._signal_connector  # where `trainer.received_sigterm` is read from

    def note_once(signum, frame) -> None:
        if connector.received_sigterm:
            return
        launcher = trainer.strategy.launcher
        if launcher is not None:
            launcher.kill(signum)
        connector.received_sigterm = True

    signal.signal(signal.SIGTERM, note_once)
