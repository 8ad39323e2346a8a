"""FasterVLM on handmade CLS attention, and on a bf16 model as its reference computes it (fp16 there)."""

import copy

import pytest
import torch

from litelvlm.pruners import FasterVLM, MissingSignalError, PrunerError, Signal, VisualSignals, build_pruner


def signals_of(attention: torch.Tensor) -> VisualSignals:
    return VisualSignals(cls_attention=attention, num_patches=attention.shape[-1], batch_size=attention.shape[0])


def test_top_r_by_the_head_mean_in_raster_order():
    # Head means: 0.3, 0.5, 0.1, 0.6, 0.2 -> top 3 = 3, 1, 0 -> raster [0, 1, 3]. Head 0 alone: {0, 2, 4}.
    attention = torch.tensor([[[0.6, 0.0, 0.2, 0.2, 0.4], [0.0, 1.0, 0.0, 1.0, 0.0]]])
    assert FasterVLM(num_tokens=3).select(signals_of(attention)).tolist() == [[0, 1, 3]]
    assert FasterVLM(num_tokens=1).select(signals_of(attention)).tolist() == [[3]]


def test_ties_go_to_the_lower_index_per_sample():
    # Sample 0: means 0.5, 0.25, 0.5, 0.25, 0.5 -> R = 2 keeps 0 and 2 (4 ties with them).
    # Sample 1: means 0.25, 0.5, 0.5, 0.5, 0.25 -> R = 2 keeps 1 and 2.
    attention = torch.tensor([
        [[1.0, 0.5, 1.0, 0.5, 1.0], [0.0, 0.0, 0.0, 0.0, 0.0]],
        [[0.5, 1.0, 1.0, 1.0, 0.5], [0.0, 0.0, 0.0, 0.0, 0.0]],
    ])
    assert FasterVLM(num_tokens=2).select(signals_of(attention)).tolist() == [[0, 2], [1, 2]]


def test_r_equal_to_n_keeps_every_patch_and_budgets_out_of_range_are_errors():
    attention = torch.rand(2, 3, 6)
    assert FasterVLM(num_tokens=6).select(signals_of(attention)).tolist() == [list(range(6))] * 2
    with pytest.raises(PrunerError, match="larger than the 6"):
        FasterVLM(num_tokens=7).select(signals_of(attention))
    with pytest.raises(PrunerError, match="num_tokens must be >= 1, got 0"):
        FasterVLM(num_tokens=0)
    with pytest.raises(MissingSignalError, match="cls_attention"):
        FasterVLM(num_tokens=2).select(VisualSignals(patch_features=torch.rand(1, 6, 4)))


def test_declares_only_the_cls_attention_and_is_registered():
    pruner = build_pruner("fastervlm", num_tokens=64)
    assert type(pruner) is FasterVLM and pruner.required_signals == {Signal.CLS_ATTENTION}
    assert (FasterVLM().num_tokens, FasterVLM().score_dtype, FasterVLM.group_names) == (192, "model", ("kept",))


@pytest.fixture(scope="module")
def bf16_model(tiny_model):
    return copy.deepcopy(tiny_model).to(torch.bfloat16)


@pytest.mark.parametrize("score_dtype", ["model", "float32"])
def test_on_a_bf16_model_the_reference_rule_in_each_score_dtype(bf16_model, demo_batch, score_dtype):
    """`model`: the bf16 CLS attention averaged over heads in bf16 (the reference: fp16 `mean(dim=1)`,
    `topk`); `float32`: the upcast mean. Ranked by a stable sort, kept in raster order."""
    model = bf16_model
    pruner = FasterVLM(num_tokens=48, score_dtype=score_dtype)
    with torch.no_grad():
        signals = model.encode(demo_batch, [pruner], for_grounding=False).signals_by_score_dtype[score_dtype]
    attention = signals.cls_attention
    assert attention.dtype == (torch.bfloat16 if score_dtype == "model" else torch.float32)
    mean = attention.mean(dim=1) if score_dtype == "model" else attention.float().mean(dim=1)
    assert mean.dtype == attention.dtype
    expected = torch.sort(mean, dim=-1, descending=True, stable=True).indices[:, :48].sort(dim=-1).values
    assert pruner.select(signals).tolist() == expected.tolist()
