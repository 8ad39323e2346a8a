"""VisionZip's merge and split: a hand computation, a written-out reference on random inputs, and the pruner at 576 patches."""

import pytest
import torch

from litelvlm.pruners import PrunerError, Signal, VisionZip, VisualReduction, VisualSignals, build_pruner
from litelvlm.pruners.visionzip import merge_contextual, split_budget


def reference_merge(hidden: torch.Tensor, keys: torch.Tensor, c: int) -> torch.Tensor:
    """The rule of `visionzip/clip_encoder.py:64-80` written out one token at a time, in float64."""
    m = keys.shape[0]
    step = max(1, m // c)
    targets = list(range(0, m, step))[:c]
    unit = [keys[i].double() / keys[i].double().norm() for i in range(m)]
    groups = {t: [] for t in targets}
    for i in range(m):
        if i in groups:
            continue
        cosines = [float(unit[i] @ unit[t]) for t in targets]
        groups[targets[cosines.index(max(cosines))]].append(i)  # first target on ties
    out = []
    for t in targets:
        members = groups[t]
        mean = sum((hidden[i].double() for i in members), torch.zeros(hidden.shape[1], dtype=torch.float64))
        out.append(hidden[t].double() + mean / max(1, len(members)))
    return torch.stack(out)


def test_a_hand_computed_merge():
    # M = 5, C = 2: s = 5 // 2 = 2, targets 0 and 2. Keys (unnormalised): 0 -> x, 2 -> y; patch 1 leans to
    # x, 3 to y, 4 to x (its larger norm does not matter). Target 0 gets {1, 4}, target 2 gets {3}.
    keys = torch.tensor([[1.0, 0.0], [2.0, 1.0], [0.0, 3.0], [0.1, 1.0], [5.0, 0.5]])
    hidden = torch.tensor([[1.0, 0.0], [2.0, 2.0], [0.0, 1.0], [4.0, 4.0], [6.0, 0.0]])
    # 0: h0 + (h1 + h4) / 2 = (1, 0) + (4, 1); 1: h2 + h3 = (0, 1) + (4, 4).
    assert merge_contextual(hidden, keys, 2).tolist() == [[5.0, 1.0], [4.0, 5.0]]
    # C = M: every patch is its own target, joined by nobody: the states themselves (+ 0, not / 0).
    assert torch.equal(merge_contextual(hidden, keys, 5), hidden)
    # C = 1: one target (patch 0) plus the mean of the other four.
    assert merge_contextual(hidden, keys, 1).tolist() == [[4.0, 1.75]]


def test_equals_the_written_out_reference_on_random_inputs_with_ties():
    generator = torch.Generator().manual_seed(0)
    for m, c in [(91, 90), (522, 10), (414, 30), (40, 7), (13, 13), (8, 1)]:
        hidden = torch.randn(m, 16, generator=generator)
        keys = torch.randn(m, 6, generator=generator)
        keys[1::3] = keys[0]  # exact ties between targets and duplicated keys
        torch.testing.assert_close(merge_contextual(hidden, keys, c).double(), reference_merge(hidden, keys, c))


def test_no_contextual_token_is_an_empty_result_and_too_many_is_an_error():
    hidden, keys = torch.rand(4, 3), torch.rand(4, 2)
    assert merge_contextual(hidden, keys, 0).shape == (0, 3)
    with pytest.raises(PrunerError, match="cannot merge 4 patches into 5"):
        merge_contextual(hidden, keys, 5)


@pytest.mark.parametrize("budget, split", [(192, (162, 30)), (128, (108, 20)), (64, (54, 10)), (1, (1, 0)),
                                           (4, (3, 1)), (96, (81, 15)), (576, (486, 90))])
def test_the_budget_split_follows_the_reference_ratio(budget, split):
    assert split_budget(budget) == split


def signals_576(b: int = 2, seed: int = 0) -> VisualSignals:
    generator = torch.Generator().manual_seed(seed)
    n, d = 576, 12
    return VisualSignals(
        cls_attention_sum=torch.rand(b, n, generator=generator),
        select_keys=torch.randn(b, n, 4, generator=generator),
        patch_features=torch.randn(b, n, d, generator=generator),
        cls_features=torch.randn(b, d, generator=generator),
        num_patches=n, batch_size=b,
    )


@pytest.mark.parametrize("budget", [1, 64, 128, 192, 575, 576])
def test_the_pruner_at_576_patches_feeds_cls_dominants_and_merges(budget):
    signals = signals_576()
    reduction = VisionZip(num_tokens=budget).reduce(signals)
    dominant, contextual = split_budget(budget)
    assert isinstance(reduction, VisualReduction) and reduction.merged and reduction.kept is None
    assert reduction.features.shape == (2, budget, 12)
    assert reduction.groups.tolist() == [[0] * dominant + [1] * contextual] * 2
    for b in range(2):
        top = torch.sort(signals.cls_attention_sum[b], descending=True, stable=True).indices[: dominant - 1]
        patches = sorted(top.tolist())
        rest = [i for i in range(576) if i not in set(patches)]
        expected = torch.cat([
            signals.cls_features[b, None],
            signals.patch_features[b, patches],
            merge_contextual(signals.patch_features[b, rest], signals.select_keys[b, rest], contextual),
        ])
        assert torch.equal(reduction.features[b], expected)
        members = reduction.members[b]
        assert not members[0].any()  # [CLS] stands for no patch
        assert [row.nonzero().flatten().tolist() for row in members[1:dominant]] == [[p] for p in patches]
        if contextual:  # the merged tokens' members are exactly the rest, each patch once
            assert members[dominant:].sum(0).tolist() == [0 if i in set(patches) else 1 for i in range(576)]


def test_budgets_outside_1_to_n_and_other_orders_are_errors():
    with pytest.raises(PrunerError, match="num_tokens must be >= 1, got 0"):
        VisionZip(num_tokens=0)
    with pytest.raises(PrunerError, match="num_tokens=577 is larger than the 576"):
        VisionZip(num_tokens=577).reduce(signals_576())
    with pytest.raises(PrunerError, match="kept_order must be 'reference'"):
        VisionZip(num_tokens=64, kept_order="raster")
    with pytest.raises(PrunerError, match="position_ids 'contiguous'"):
        VisionZip(num_tokens=64, position_ids="original")
    with pytest.raises(PrunerError, match="no kept indices"):
        VisionZip(num_tokens=64).select(signals_576())


def test_declares_its_signals_and_is_registered():
    pruner = build_pruner("visionzip", num_tokens=64)
    assert type(pruner) is VisionZip and VisionZip.group_names == ("dominant", "contextual")
    assert pruner.required_signals == {Signal.CLS_ATTENTION_SUM, Signal.SELECT_KEYS, Signal.PATCH_FEATURES,
                                       Signal.CLS_FEATURES}
