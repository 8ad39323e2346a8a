"""Side concerns of an evaluation run, as Lightning callbacks."""

from litelvlm.engine.callbacks.profiler import EfficiencyProfiler
from litelvlm.engine.callbacks.records import SampleRecords
from litelvlm.engine.callbacks.report import EvaluationReport

__all__ = ["EfficiencyProfiler", "EvaluationReport", "SampleRecords"]
