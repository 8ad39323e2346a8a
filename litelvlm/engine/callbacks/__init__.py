"""Side concerns of an evaluation run, as Lightning callbacks."""

from litelvlm.engine.callbacks.profiler import EfficiencyProfiler
from litelvlm.engine.callbacks.records import SampleRecords
from litelvlm.engine.callbacks.report import EvaluationReport
from litelvlm.engine.callbacks.status import RunStatus

__all__ = ["EfficiencyProfiler", "EvaluationReport", "RunStatus", "SampleRecords"]
