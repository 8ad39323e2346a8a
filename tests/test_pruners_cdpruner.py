"""CDPruner: relevance, the DPP's fast greedy MAP (with its d2 <= 0 guard) and the pruner, by hand and
against the reference's `encode_images` written out (Theia-4869/CDPruner `llava/model/llava_arch.py`)."""

import copy
import math

import pytest
import torch

from litelvlm.pruners import CDPruner, MissingSignalError, PrunerError, Signal, VisualSignals, build_pruner
from litelvlm.pruners.cdpruner import dpp_greedy_map, relevance


def reference_map(kernel: torch.Tensor, k: int, guard: bool) -> list[int]:
    """The reference's loop for one sample (B = 1): argmax d2, e = (L[j] - sum c_t[j] c_t) / sqrt(d2_j),
    d2 -= e^2, d2_j = -inf. `guard` adds the framework's change: no update once d2_j <= 0."""
    n = kernel.shape[0]
    cis = torch.zeros(k, 1, n)
    di2s = torch.diagonal(kernel).clone()[None]
    picks = []
    for i in range(k):
        j = torch.argmax(di2s, dim=-1)
        picks.append(int(j))
        if not guard or di2s[0, j] > 0:
            eis = (kernel[j] - torch.einsum("tb,tbn->bn", cis[:i, torch.arange(1), j], cis[:i])) / torch.sqrt(di2s[torch.arange(1), j]).unsqueeze(-1)
            cis[i] = eis
            di2s -= torch.square(eis)
        di2s[torch.arange(1), j] = -float("inf")
    return picks


def reference_kernel(features, patch_embeds, text_embeds):
    """`encode_images` up to the kernel, for one sample: cosine similarity, -cos relevance, min-max."""
    normalized = (features / features.norm(dim=-1, keepdim=True)).float()
    similarity = normalized @ normalized.T
    image = patch_embeds / patch_embeds.norm(dim=-1, keepdim=True)
    text = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
    rel = (-(image @ text.T)).mean(dim=-1)
    rel = (rel - rel.min() + 1e-6) / (rel.max() - rel.min())
    return rel[:, None] * similarity * rel[None, :]


def test_relevance_by_hand():
    patches = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    # One text along x: cos = 1, 0, 0.7071 -> -cos = -1, 0, -0.7071; min -1, max 0.
    expected = torch.tensor([1e-6, 1 + 1e-6, 1 - 1 / math.sqrt(2) + 1e-6])
    torch.testing.assert_close(relevance(patches, torch.tensor([[3.0, 0.0]])), expected)
    # Two texts (x and y): -cos averaged = -0.5, -0.5, -0.7071: patch 2 is the most relevant to both.
    two = relevance(patches, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    spread = 1 / math.sqrt(2) - 0.5
    torch.testing.assert_close(two, torch.tensor([spread + 1e-6, spread + 1e-6, 1e-6]) / spread)
    # Equal relevance everywhere: ones (the reference divides 1e-6 by 0).
    assert relevance(torch.ones(3, 2), torch.tensor([[1.0, 0.0]])).tolist() == [1.0, 1.0, 1.0]


def test_greedy_map_by_hand_conditions_on_what_it_picked():
    # d2 = 4, 3, 2.5 -> pick 0; e = L[0] / 2 = (2, 1, 0); d2 = (0, 2, 2.5) -> pick 2 (token 1 is
    # similar to 0), e = (0, 0, sqrt(2.5)); then 1. The diagonal alone would rank 0, 1, 2.
    kernel = torch.tensor([[4.0, 2.0, 0.0], [2.0, 3.0, 0.0], [0.0, 0.0, 2.5]])
    assert dpp_greedy_map(kernel, 3).tolist() == [0, 2, 1]
    assert dpp_greedy_map(kernel, 1).tolist() == [0]


def test_a_used_up_rank_gives_no_nan_and_no_repeat():
    # L = v v^T, v = (1, 2, 3): rank 1. Pick 2 (d2 9); e = (1, 2, 3); d2 = (0, 0, -inf): the reference
    # now divides 0 by sqrt(0). Guarded: pick 0 then 1 (ties to the lower index), no update.
    v = torch.tensor([1.0, 2.0, 3.0])
    kernel = v[:, None] * v[None, :]
    assert dpp_greedy_map(kernel, 3).tolist() == [2, 0, 1]
    cis = (kernel[2] - 0) / 3.0
    gains = torch.diagonal(kernel) - cis.square()
    assert gains[:2].tolist() == [0.0, 0.0] and math.isnan(float((kernel[0] - cis[0] * cis)[0] / gains[0].sqrt()))


@pytest.mark.parametrize("seed", range(3))
def test_equals_the_reference_on_random_kernels_with_ties_and_low_rank(seed):
    generator = torch.Generator().manual_seed(seed)
    n = 30
    for dim, k in ((64, 30), (64, 7), (5, 30), (5, 12)):  # full rank, then rank 5 < N (d2 <= 0 from step 5 on)
        features = torch.randn(n, dim, generator=generator)
        patch = torch.randn(n, 4, generator=generator)
        kernel = reference_kernel(features, patch, torch.randn(2, 4, generator=generator))
        picks = dpp_greedy_map(kernel, k).tolist()
        assert picks == reference_map(kernel, k, guard=True) and len(set(picks)) == k
        if dim > n:  # full rank: the guard never acts, the reference itself
            assert picks == reference_map(kernel, k, guard=False)
    tied = torch.eye(6) * 2.0  # equal gains everywhere: index order
    assert dpp_greedy_map(tied, 6).tolist() == reference_map(tied, 6, guard=False) == list(range(6))


def signals_of(features, patch_embeds, text_embeds, text_mask=None):
    return VisualSignals(projected_features=features, patch_embeds=patch_embeds, text_embeds=text_embeds, text_mask=text_mask)


def test_the_pruner_averages_every_real_question_and_sorts():
    generator = torch.Generator().manual_seed(0)
    features, patch = torch.randn(2, 16, 8, generator=generator), torch.randn(2, 16, 4, generator=generator)
    text = torch.randn(2, 3, 4, generator=generator)
    mask = torch.tensor([[True, True, True], [True, False, False]])
    kept = CDPruner(num_tokens=5).select(signals_of(features, patch, text, mask))
    expected = [sorted(dpp_greedy_map(reference_kernel(features[0], patch[0], text[0]), 5).tolist()),
                sorted(dpp_greedy_map(reference_kernel(features[1], patch[1], text[1, :1]), 5).tolist())]
    assert kept.tolist() == expected
    assert CDPruner(num_tokens=16).select(signals_of(features, patch, text, mask)).tolist() == [list(range(16))] * 2
    with pytest.raises(PrunerError, match="larger than the 16"):
        CDPruner(num_tokens=17).select(signals_of(features, patch, text, mask))
    with pytest.raises(PrunerError, match="no question"):
        CDPruner(num_tokens=3).select(signals_of(features, patch, text, torch.zeros(2, 3, dtype=torch.bool)))
    with pytest.raises(PrunerError, match="cannot pick 0 of 4"):
        dpp_greedy_map(torch.eye(4), 0)
    with pytest.raises(MissingSignalError, match="text_embeds"):
        CDPruner(num_tokens=3).select(signals_of(features, patch, None))
    pruner = build_pruner("cdpruner", num_tokens=8)
    assert type(pruner) is CDPruner
    assert pruner.required_signals == {Signal.PROJECTED_FEATURES, Signal.PATCH_EMBEDS, Signal.TEXT_EMBEDS}


@pytest.fixture(scope="module")
def bf16_model(tiny_model):
    return copy.deepcopy(tiny_model).to(torch.bfloat16)


def test_on_a_bf16_model_the_reference_pipeline(bf16_model, demo_batch):
    """`model`: bf16 projected features normalised in bf16, then float32 from the cosines on."""
    pruner = CDPruner(num_tokens=48)
    with torch.no_grad():
        shared = bf16_model.encode(demo_batch, [pruner], for_grounding=False)
    signals = shared.signals_by_score_dtype["model"]
    text, mask = shared.text_embeds[("question", "eos", "chunk")]
    signals.text_embeds, signals.text_mask = text, mask
    assert signals.projected_features.dtype == torch.bfloat16
    expected = []
    for b in range(signals.batch_size):
        kernel = reference_kernel(signals.projected_features[b], signals.patch_embeds[b].float(), text[b][mask[b]])
        expected.append(sorted(reference_map(kernel, 48, guard=True)))
    assert pruner.select(signals).tolist() == expected
