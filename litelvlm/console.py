"""Keep library chatter that is not the user's concern off a run's console, one message at a time.

Each filter names the message and where it comes from; every other warning and log line stays.
"""

from __future__ import annotations

import logging
import warnings

# Lightning's advertisements for its cloud products ("💡 Tip: ... litlogger / litmodels"): not about the run.
TIP_PREFIX = "💡 Tip:"
RANK_ZERO_LOGGERS = ("lightning_utilities.core.rank_zero", "lightning.fabric.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero")


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(TIP_PREFIX)


def quiet_console() -> None:
    """Install the filters (idempotent): before the Trainer is built, in every process of a run."""
    for name in RANK_ZERO_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(existing, _DropTips) for existing in logger.filters):
            logger.addFilter(_DropTips())
    # Lightning's own _pytree.py builds torch's deprecated LeafSpec on every batch it moves; the
    # deprecation is Lightning's to act on, nothing a user of this project can change.
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
        module=r"lightning\.pytorch\.utilities\._pytree",
    )
    # Under DDP Lightning suggests sync_dist=True for every epoch-level value logged without it. The
    # module's val/test values come from metrics whose states are summed over all processes before
    # compute() (ExactReferringIoU), so every process logs the same exact number; averaging it again
    # would change nothing. The warning stays for any other name logged this way.
    warnings.filterwarnings(
        "ignore",
        message=r"It is recommended to use `self\.log\('(val|test)/[^']*(ciou|giou|num_masks|visual_tokens)', \.\.\., sync_dist=True\)`",
        module=r"lightning\.pytorch\.trainer\.connectors\.logger_connector\.result",
    )
