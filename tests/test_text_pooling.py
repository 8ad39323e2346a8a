"""The `text_pooling` knob: `mean` is the mean of the content tokens' final states, through CLIP's
final layer norm and text projection; `eos` is CLIP's own projected [EOS] state."""

from __future__ import annotations

import pytest
import torch

from litelvlm.pruners import LiteLVLM, PrunerError, SimilarityOnly


@torch.no_grad()
def test_mean_pooling_equals_a_direct_computation(tiny_model):
    texts = [["the red circle left of the blue square", "the big green triangle"], ["the small square"]]
    mean, mask = tiny_model.encode_text(texts, "mean")
    eos, _ = tiny_model.encode_text(texts, "eos")
    assert mask.tolist() == [[True, True], [True, False]]
    tower, tokenizer = tiny_model.text_tower, tiny_model.clip_tokenizer
    for b, questions in enumerate(texts):
        for t, text in enumerate(questions):
            ids = torch.tensor([tokenizer(text)["input_ids"]])
            out = tower(input_ids=ids, output_hidden_states=True)
            content = out.hidden_states[-1][0, 1:-1]  # between [SOS] and [EOS], before the final norm
            expected = tower.text_projection(tower.text_model.final_layer_norm(content.mean(0)))
            torch.testing.assert_close(mean[b, t], expected.float(), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(eos[b, t], out.text_embeds[0].float(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(mean[mask], eos[mask])


@torch.no_grad()
def test_pruners_get_the_pooling_they_ask_for(tiny_model, demo_batch):
    shared = tiny_model.encode(demo_batch, [LiteLVLM(num_tokens=64), LiteLVLM(num_tokens=64, text_pooling="mean")])
    assert set(shared.text_embeds) == {("question", "eos", "truncate"), ("question", "mean", "truncate")}
    mean_only = SimilarityOnly(num_tokens=64, text_pooling="mean")
    expected = mean_only.select(
        type(shared.signals)(**{**vars(shared.signals), "text_embeds": shared.text_embeds["question", "mean", "truncate"][0],
                                "text_mask": shared.text_embeds["question", "mean", "truncate"][1]})
    )
    output = tiny_model.ground(demo_batch, shared, mean_only)
    assert torch.equal(output.kept_indices, expected)
    assert mean_only.hparams()["text_pooling"] == "mean"


def test_unknown_pooling_is_a_clear_error():
    with pytest.raises(PrunerError, match="text_pooling"):
        LiteLVLM(text_pooling="max")
