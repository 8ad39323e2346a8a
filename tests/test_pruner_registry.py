"""Building pruners by short name, class name and class path; the shipped pruner configs."""

import sys
import textwrap
from pathlib import Path

import pytest
import torch
from jsonargparse import ArgumentParser

import litelvlm.pruners as pruners
from litelvlm.pruners import PrunerError, TokenPruner, VisualSignals, build_pruner, class_path_of, list_pruners

SHORT_NAMES = {
    "none": pruners.NoPruning,
    "random": pruners.RandomPruner,
    "litelvlm": pruners.LiteLVLM,
    "similarity-only": pruners.SimilarityOnly,
    "context-only": pruners.ContextOnly,
    "reversed-similarity": pruners.ReversedSimilarity,
    "fastv": pruners.FastV,
    "vispruner": pruners.VisPruner,
    "fastervlm": pruners.FasterVLM,
    "divprune": pruners.DivPrune,
    "cdpruner": pruners.CDPruner,
    "visionzip": pruners.VisionZip,
}
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "pruners"


def test_importing_the_package_registers_every_strategy():
    assert set(SHORT_NAMES) <= set(list_pruners())
    for short_name, cls in SHORT_NAMES.items():
        assert type(build_pruner(short_name)) is cls
        assert cls.short_name == short_name


def test_build_by_class_name_and_class_path_with_arguments():
    assert type(build_pruner("LiteLVLM", num_tokens=64)) is pruners.LiteLVLM
    assert build_pruner("litelvlm.pruners.LiteLVLM", num_tokens=64).num_tokens == 64
    vispruner = build_pruner("litelvlm.pruners.vispruner.VisPruner", num_tokens=32, important_ratio=0.25)
    assert (vispruner.num_tokens, vispruner.important_ratio) == (32, 0.25)
    assert build_pruner("fastv", layer=3, mode="mask").prune_layer == 3
    assert class_path_of("litelvlm") == "litelvlm.pruners.litelvlm.LiteLVLM"
    assert class_path_of("similarity-only") == "litelvlm.pruners.litelvlm.SimilarityOnly"


def test_unknown_names_and_bad_arguments_are_errors():
    with pytest.raises(PrunerError, match="unknown pruner 'tome'"):
        build_pruner("tome")
    with pytest.raises(PrunerError, match="cannot import"):
        build_pruner("litelvlm.pruners.NoSuchPruner")
    with pytest.raises(PrunerError, match="not a TokenPruner"):
        build_pruner("torch.nn.Linear")
    with pytest.raises(PrunerError, match="bad arguments"):
        build_pruner("vispruner", ratio=0.5)


def test_a_pruner_defined_outside_the_package(tmp_path, monkeypatch):
    module = tmp_path / "outside_pruners_for_test.py"
    module.write_text(textwrap.dedent("""
        import torch
        from litelvlm.pruners import Signal, TokenPruner, register_pruner, top_k_indices

        @register_pruner("test-last-patches")
        class LastPatches(TokenPruner):
            '''Keeps the R highest patch indices (a test pruner).'''
            def __init__(self, num_tokens: int = 2):
                super().__init__(num_tokens=num_tokens)

            @property
            def required_signals(self):
                return frozenset({Signal.PATCH_FEATURES})

            def select(self, signals):
                features = signals.require(Signal.PATCH_FEATURES)
                index = torch.arange(features.shape[1], device=features.device).expand(features.shape[:2])
                return top_k_indices(index, self.budget(features.shape[1])).sort(dim=-1).values
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "outside_pruners_for_test", raising=False)
    by_path = build_pruner("outside_pruners_for_test.LastPatches", num_tokens=3)
    by_name = build_pruner("test-last-patches", num_tokens=3)
    assert type(by_path) is type(by_name)
    signals = VisualSignals(patch_features=torch.zeros(2, 5, 4))
    assert by_name.select(signals).tolist() == [[2, 3, 4], [2, 3, 4]]


class _Model:
    """Stands in for the LightningModule: the configs target its `pruner` init argument."""

    def __init__(self, pruner: TokenPruner):
        self.pruner = pruner


CONFIG_CLASSES = {
    "none": pruners.NoPruning,
    "random": pruners.RandomPruner,
    "litelvlm": pruners.LiteLVLM,
    "similarity_only": pruners.SimilarityOnly,
    "context_only": pruners.ContextOnly,
    "reversed_similarity": pruners.ReversedSimilarity,
    "fastv": pruners.FastV,
    "vispruner": pruners.VisPruner,
    "fastervlm": pruners.FasterVLM,
    "divprune": pruners.DivPrune,
    "cdpruner": pruners.CDPruner,
    "visionzip": pruners.VisionZip,
    "pdrop": pruners.PyramidDrop,
    "dart": pruners.DART,
    "sparsevlm": pruners.SparseVLM,
}


@pytest.mark.parametrize("config_name", sorted(CONFIG_CLASSES))
def test_pruner_configs_instantiate_through_jsonargparse(config_name):
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(_Model, "model")
    config = parser.parse_path(str(CONFIGS / f"{config_name}.yaml"))
    pruner = parser.instantiate(config).model.pruner
    assert type(pruner) is CONFIG_CLASSES[config_name]
    # The PyramidDrop preset is the official layer/ratio setting, not a budget.
    assert pruner.num_tokens == (None if config_name in ("none", "pdrop") else 192)


def test_every_registered_pruner_keeps_exactly_r_distinct_indices_or_r_tokens_of_distinct_patches():
    torch.manual_seed(0)
    batch, patches = 2, 12
    signals = VisualSignals(
        patch_features=torch.randn(batch, patches, 4),
        patch_embeds=torch.randn(batch, patches, 3),
        projected_features=torch.randn(batch, patches, 5),
        text_embeds=torch.randn(batch, 2, 3),
        text_mask=torch.tensor([[True, True], [True, False]]),
        cls_attention=torch.rand(batch, 2, patches),
        cls_attention_sum=torch.rand(batch, patches),
        select_keys=torch.randn(batch, patches, 2),
        cls_features=torch.randn(batch, 4),
        last_qkv=tuple(torch.randn(3, batch, patches + 1, 4).unbind(0)),
        num_patches=patches,
        batch_size=batch,
        sample_ids=torch.tensor([7, 8]),
    )
    llm_attention = torch.rand(batch, patches)
    for name in sorted(SHORT_NAMES.keys() - {"none"}):
        for budget in range(1, patches + 1):
            pruner = build_pruner(name, num_tokens=budget)
            if not pruner.acts_in_llm:  # what the model calls: R tokens, no patch standing in two of them
                reduction = pruner.reduce(signals)
                assert reduction.members.shape == (batch, budget, patches) and reduction.groups.shape == (batch, budget)
                assert int(reduction.members.sum(1).max()) <= 1, (name, budget)
                if reduction.merged:
                    assert reduction.features.shape == (batch, budget, 4), (name, budget)
                    continue
            kept = pruner.select_in_llm(llm_attention) if pruner.acts_in_llm else pruner.select(signals)
            assert kept.shape == (batch, budget), name
            assert all(len(set(row)) == budget for row in kept.tolist()), (name, budget)
            if not pruner.acts_in_llm:  # each token stands for its own patch
                assert reduction.members.nonzero()[:, 2].view(batch, budget).tolist() == kept.tolist(), name
    assert build_pruner("none").select(signals).tolist() == [list(range(patches))] * batch
