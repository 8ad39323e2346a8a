"""Studies that explain why text-guided pruning works, run as Lightning callbacks during validate/test."""

from litelvlm.analysis.attention_sink import TextAttentionSinkStudy
from litelvlm.analysis.bootstrap import bootstrap_mean
from litelvlm.analysis.reversal import RULE_PRUNERS, SimilarityReversalStudy
from litelvlm.analysis.retention import TokenRetentionVisualizer

__all__ = ["RULE_PRUNERS", "SimilarityReversalStudy", "TextAttentionSinkStudy", "TokenRetentionVisualizer", "bootstrap_mean"]
