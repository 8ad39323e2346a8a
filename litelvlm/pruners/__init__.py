"""Visual-token pruning strategies on one base class, buildable by name."""

from litelvlm.pruners.base import (
    LLMSelection,
    MissingSignalError,
    PrunerError,
    Signal,
    TokenPruner,
    VisualReduction,
    VisualSignals,
    top_k_indices,
)
from litelvlm.pruners.registry import build_pruner, class_path_of, list_pruners, register_pruner, resolve_pruner_class
from litelvlm.pruners.simple import NoPruning, RandomPruner
from litelvlm.pruners.fastv import FastV
from litelvlm.pruners.litelvlm import ContextOnly, LiteLVLM, ReversedSimilarity, SimilarityOnly
from litelvlm.pruners.vispruner import VisPruner
from litelvlm.pruners.fastervlm import FasterVLM
from litelvlm.pruners.divprune import DivPrune
from litelvlm.pruners.cdpruner import CDPruner
from litelvlm.pruners.visionzip import VisionZip
from litelvlm.pruners.pdrop import PyramidDrop
from litelvlm.pruners.dart import DART
from litelvlm.pruners.sparsevlm import SparseVLM

__all__ = [
    "CDPruner",
    "DART",
    "ContextOnly",
    "DivPrune",
    "FastV",
    "FasterVLM",
    "LLMSelection",
    "LiteLVLM",
    "MissingSignalError",
    "NoPruning",
    "PrunerError",
    "PyramidDrop",
    "RandomPruner",
    "ReversedSimilarity",
    "Signal",
    "SimilarityOnly",
    "SparseVLM",
    "TokenPruner",
    "VisPruner",
    "VisionZip",
    "VisualReduction",
    "VisualSignals",
    "build_pruner",
    "class_path_of",
    "list_pruners",
    "register_pruner",
    "resolve_pruner_class",
    "top_k_indices",
]
