"""VisPruner on handmade attention and features with known duplicates."""

import pytest
import torch

from litelvlm.pruners import MissingSignalError, PrunerError, Signal, VisPruner, VisualSignals


def attention_descending_by_index(num_patches: int) -> torch.Tensor:
    """[1, 2, N] CLS attention whose head mean falls with the patch index (head 1 alone would rise),
    so the attention ranking is 0, 1, 2, ..."""
    head0 = torch.arange(num_patches, 0, -1, dtype=torch.float) * 2 - 1  # 2N-1, ..., 3, 1
    head1 = torch.arange(num_patches, dtype=torch.float)  # 0, 1, ..., N-1
    return torch.stack([head0, head1]).unsqueeze(0)  # mean (2N-1-i)/2: descending


def basis(dim: int, i: int, scale: float = 1.0) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(i), dim).float() * scale


def test_duplicates_are_removed_from_the_even_half():
    # N = 10, R = 8, ratio 0.25 -> floor(2) = 2 important: patches 0 and 1 (kept whatever their
    # features, patch 0 duplicates patch 3). Remaining list by attention: 2..9, target 6, so one
    # round drops min(8, 8 - 6, |A| = 4) = 2 tokens of A = [2, 4, 6, 8] against B = [3, 5, 7, 9].
    # B = e0, e1, e2, e3. Max cosine to B: patch 2 = e4 -> 0; patch 4 = e0 -> 1 (duplicate of 3);
    # patch 6 = 10 (e1 + e4) / sqrt(2) -> 0.707 (its raw dot product 7.07 would rank it first);
    # patch 8 = 2 e2 -> 1 (duplicate of 7 up to scale). Dropped: 4 and 8.
    e = [basis(5, i) for i in range(5)]
    features = torch.stack([
        e[0], e[1],  # important
        e[4], e[0], e[0], e[1], (e[1] + e[4]) * 10 / 2**0.5, e[2], 2 * e[2], e[3],
    ]).unsqueeze(0)
    signals = VisualSignals(cls_attention=attention_descending_by_index(10), patch_features=features)
    kept = VisPruner(num_tokens=8, important_ratio=0.25).select(signals)
    assert kept.tolist() == [[0, 1, 2, 3, 5, 6, 7, 9]]


def test_odd_remainder_and_more_to_drop_than_a_holds():
    # N = 8, R = 4, ratio 0.5 -> important 0 and 1. Remaining 2..7 (6 tokens), target 2.
    # Round 1: 4 must go but A = [2, 4, 6] holds 3 -> all of A goes; remaining B = [3, 5, 7].
    # Round 2 (odd): A = [3, 7], B = [5]; drop min(8, 1, 2) = 1: patch 3 duplicates 5 (cosine 1)
    # while 7 is orthogonal (0) -> drop 3. Kept: 0, 1, 5, 7.
    e = [basis(3, i) for i in range(3)]
    features = torch.stack([e[2], e[2], e[0], e[0], e[0], e[0], e[0], e[1]]).unsqueeze(0)
    signals = VisualSignals(cls_attention=attention_descending_by_index(8), patch_features=features)
    assert VisPruner(num_tokens=4).select(signals).tolist() == [[0, 1, 5, 7]]


def test_important_tokens_follow_the_head_mean_attention():
    # ratio 1: all R tokens by attention. Head means: 0.3, 0.5, 0.1, 0.6, 0.2 -> top 3 = {3, 1, 0},
    # returned in raster order. Head 0 alone would pick {0, 2, 4}.
    attention = torch.tensor([[[0.6, 0.0, 0.2, 0.2, 0.4], [0.0, 1.0, 0.0, 1.0, 0.0]]])
    signals = VisualSignals(cls_attention=attention, patch_features=torch.randn(1, 5, 3))
    assert VisPruner(num_tokens=3, important_ratio=1.0).select(signals).tolist() == [[0, 1, 3]]


def test_exactly_r_distinct_indices_in_raster_order_for_every_budget():
    torch.manual_seed(0)
    batch, patches = 3, 12
    signals = VisualSignals(cls_attention=torch.rand(batch, 2, patches), patch_features=torch.randn(batch, patches, 4))
    for ratio in (0.0, 0.5, 1.0):
        for budget in range(1, patches + 1):
            kept = VisPruner(num_tokens=budget, important_ratio=ratio).select(signals)
            assert kept.shape == (batch, budget)
            for row in kept.tolist():
                assert row == sorted(set(row)) and len(row) == budget


def test_required_signals_and_errors():
    assert VisPruner().required_signals == {Signal.CLS_ATTENTION, Signal.PATCH_FEATURES}
    assert (VisPruner().num_tokens, VisPruner().important_ratio) == (192, 0.5)
    with pytest.raises(MissingSignalError, match="patch_features"):
        VisPruner(num_tokens=2).select(VisualSignals(cls_attention=torch.rand(1, 2, 6)))
    with pytest.raises(PrunerError, match="larger than the 6"):
        VisPruner(num_tokens=7).select(
            VisualSignals(cls_attention=torch.rand(1, 2, 6), patch_features=torch.randn(1, 6, 3))
        )
    with pytest.raises(PrunerError, match="important_ratio"):
        VisPruner(important_ratio=1.5)
