"""Side concerns of an evaluation run, as Lightning callbacks."""

from litelvlm.engine.callbacks.report import EvaluationReport

__all__ = ["EvaluationReport"]
