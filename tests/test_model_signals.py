"""The pruning signals come from the CLIP towers exactly as docs/pruners.md says, and only when declared.

Every signal the model hands a pruner is compared with an independent computation on the plain
transformers towers (full forwards, eager attention, forward hooks), not with the model's own code.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from litelvlm.models import lvlm, visual_reduction
from litelvlm.pruners import ContextOnly, FastV, LiteLVLM, NoPruning, Signal, TokenPruner, VisPruner

PRE_LLM_SIGNALS = frozenset(Signal) - {Signal.LLM_ATTENTION}


class _Captured(Exception):
    """Raised by the recorder once it holds the signals: nothing after `select` needs to run."""


class SignalRecorder(TokenPruner):
    """Declares the given signals and keeps what the model hands to `select`."""

    def __init__(
        self, signals=PRE_LLM_SIGNALS, text_source: str = "question", stop: bool = True, score_dtype: str = "model"
    ) -> None:
        super().__init__(num_tokens=None, score_dtype=score_dtype)
        self._signals = frozenset(signals)
        self.text_source = text_source
        self.stop = stop
        self.seen = None

    @property
    def required_signals(self):
        return self._signals

    def select(self, signals):
        self.seen = signals
        if self.stop:
            raise _Captured
        return torch.arange(signals.num_patches).expand(signals.batch_size, -1).clone()


def recording(cls, stop: bool = False):
    """A subclass of a real pruner that also keeps the signals it was given (and, with `stop`,
    ends the forward there: everything that computes signals has run by then)."""

    class Recording(cls):
        def select(self, signals):
            self.seen = signals
            if stop:
                raise _Captured
            return super().select(signals)

    return Recording


@torch.no_grad()
def capture(model, batch, pruner):
    try:
        model(batch, pruner)
    except _Captured:
        pass
    return pruner.seen


class CallCounter:
    """Counts forward calls of some modules through forward hooks."""

    def __init__(self, modules: dict) -> None:
        self.counts = {name: 0 for name in modules}
        self.handles = [module.register_forward_hook(self._hook(name)) for name, module in modules.items()]

    def _hook(self, name):
        def hook(module, args, output):
            self.counts[name] += 1

        return hook

    def __enter__(self):
        return self.counts

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def tower_modules(model) -> dict:
    """The text tower and the q projection of every CLIP vision layer."""
    modules = {"text_tower": model.text_tower}
    for index, layer in enumerate(model.vision_tower.vision_model.encoder.layers):
        modules[f"q_proj_{index}"] = layer.self_attn.q_proj
    return modules


@pytest.fixture(scope="module")
def all_signals(tiny_model, demo_batch):
    return capture(tiny_model, demo_batch, SignalRecorder())


@pytest.fixture(scope="module")
def reference_vision(tiny_model, demo_batch):
    """A plain transformers forward of the vision tower, with hooks on the last layer's q/k/v."""
    last = tiny_model.vision_tower.vision_model.encoder.layers[-1].self_attn
    captured = {}
    handles = [
        module.register_forward_hook(lambda m, a, out, name=name: captured.__setitem__(name, out))
        for name, module in (("q", last.q_proj), ("k", last.k_proj), ("v", last.v_proj))
    ]
    try:
        with torch.no_grad():
            out = tiny_model.vision_tower(pixel_values=demo_batch.clip_pixel_values, output_hidden_states=True)
    finally:
        for handle in handles:
            handle.remove()
    return out, captured


def test_patch_features_are_the_select_layer_hidden_states_without_cls(tiny_model, all_signals, reference_vision):
    out, _ = reference_vision
    assert tiny_model.config.select_layer == -2
    expected = out.hidden_states[-2][:, 1:]
    assert all_signals.patch_features.shape == (2, tiny_model.num_patches, tiny_model.config.vision.hidden_size)
    torch.testing.assert_close(all_signals.patch_features, expected)
    # The select layer is not the last one: the last layer's output must differ.
    assert not torch.allclose(out.hidden_states[-1][:, 1:], expected, atol=1e-3)


def test_patch_embeds_are_post_layernorm_then_visual_projection_in_float32(tiny_model, all_signals, reference_vision):
    out, _ = reference_vision
    tower = tiny_model.vision_tower
    with torch.no_grad():
        expected = tower.visual_projection(tower.vision_model.post_layernorm(out.hidden_states[-2][:, 1:]))
    assert all_signals.patch_embeds.dtype == torch.float32
    assert all_signals.patch_embeds.shape == (2, tiny_model.num_patches, tiny_model.config.vision.projection_dim)
    torch.testing.assert_close(all_signals.patch_embeds, expected)


def test_cls_attention_equals_eager_select_layer_attention_of_cls_over_patches(tiny_model, demo_batch, all_signals):
    eager = copy.deepcopy(tiny_model.vision_tower)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        out = eager(pixel_values=demo_batch.clip_pixel_values, output_attentions=True)
    expected = out.attentions[-2][:, :, 0, 1:]
    heads = tiny_model.config.vision.num_heads
    assert all_signals.cls_attention.shape == (2, heads, tiny_model.num_patches)
    torch.testing.assert_close(all_signals.cls_attention.float(), expected)
    # Not the last layer's attention (a wrong layer would be caught).
    assert not torch.allclose(out.attentions[-1][:, :, 0, 1:], expected, atol=1e-4)
    # Computing it left the model's own tower on its fast attention.
    assert tiny_model.vision_tower.config._attn_implementation == "sdpa"


def test_last_qkv_equal_last_clip_layer_projections_of_a_full_forward(tiny_model, all_signals, reference_vision):
    _, captured = reference_vision
    q, k, v = all_signals.last_qkv
    width = tiny_model.config.vision.hidden_size
    for name, got in zip("qkv", (q, k, v)):
        assert got.shape == (2, tiny_model.num_patches + 1, width), name
        torch.testing.assert_close(got, captured[name], msg=lambda m, name=name: f"{name}: {m}")


@torch.no_grad()
def _text_embeds_one_by_one(model, strings: list[str]) -> torch.Tensor:
    rows = []
    for text in strings:
        ids = model.clip_tokenizer(text, return_tensors="pt")["input_ids"]
        assert ids.shape[1] <= model.config.text.max_length
        rows.append(model.text_tower(input_ids=ids).text_embeds[0])
    return torch.stack(rows)


def test_text_embeds_are_clip_text_embeds_of_each_question_alone(tiny_model, demo_batch):
    # Samples with different numbers of questions: sample 1 keeps only its first question.
    questions = [list(demo_batch.questions[0]), list(demo_batch.questions[1][:1])]
    batch = dataclasses.replace(demo_batch, questions=questions)
    seen = capture(tiny_model, batch, SignalRecorder({Signal.TEXT_EMBEDS}))
    assert seen.text_mask.tolist() == [[True, True, True], [True, False, False]]
    assert seen.text_embeds.dtype == torch.float32
    assert seen.text_embeds.shape == (2, 3, tiny_model.config.vision.projection_dim)
    torch.testing.assert_close(seen.text_embeds[0], _text_embeds_one_by_one(tiny_model, questions[0]))
    torch.testing.assert_close(seen.text_embeds[1, :1], _text_embeds_one_by_one(tiny_model, questions[1]))
    # Questions differ, so their embeddings do too (slots are not mixed up).
    assert not torch.allclose(seen.text_embeds[0, 0], seen.text_embeds[0, 1], atol=1e-4)


def test_text_source_expression_sends_the_bare_expressions_to_clip(tiny_model, demo_batch):
    seen = capture(tiny_model, demo_batch, SignalRecorder({Signal.TEXT_EMBEDS}, text_source="expression"))
    for b in range(2):
        expected = _text_embeds_one_by_one(tiny_model, demo_batch.expressions[b])
        torch.testing.assert_close(seen.text_embeds[b], expected)


def _clip_layers_run(model, counts) -> list[int]:
    return [counts[f"q_proj_{i}"] for i in range(len(model.vision_tower.vision_model.encoder.layers))]


def _assert_only(seen, present: set[str]) -> None:
    for name in ("patch_features", "patch_embeds", "text_embeds", "cls_attention", "last_qkv", "text_mask"):
        assert (getattr(seen, name) is not None) == (name in present), name


@torch.no_grad()
def _forward_counting(model, batch, pruner, monkeypatch):
    calls = {"cls_attention": 0, "llm_attention": 0}
    cls_attention = visual_reduction.cls_attention
    llm_attention = lvlm.PixelGroundingLVLM._last_token_attention

    def spy_cls(*args, **kwargs):
        calls["cls_attention"] += 1
        return cls_attention(*args, **kwargs)

    def spy_llm(*args, **kwargs):
        calls["llm_attention"] += 1
        return llm_attention(*args, **kwargs)

    monkeypatch.setattr(visual_reduction, "cls_attention", spy_cls)
    monkeypatch.setattr(lvlm.PixelGroundingLVLM, "_last_token_attention", staticmethod(spy_llm))
    output = None
    with CallCounter(tower_modules(model)) as counts:
        try:
            output = model(batch, pruner)
        except _Captured:
            pass
    return output, {**counts, **calls}


def test_no_pruning_computes_no_signal_and_never_calls_the_text_tower(tiny_model, demo_batch, monkeypatch):
    pruner = recording(NoPruning)()
    output, counts = _forward_counting(tiny_model, demo_batch, pruner, monkeypatch)
    assert output.visual_tokens_per_layer[0] == tiny_model.num_patches
    assert counts["text_tower"] == 0
    assert counts["cls_attention"] == 0 and counts["llm_attention"] == 0
    _assert_only(pruner.seen, set())
    # The CLIP layers run once each up to the select layer; the last layer is not needed at all.
    assert _clip_layers_run(tiny_model, counts) == [1] * (tiny_model.config.vision.num_layers - 1) + [0]


def test_context_only_uses_last_qkv_without_the_text_tower(tiny_model, demo_batch, monkeypatch):
    pruner = recording(ContextOnly, stop=True)(num_tokens=64)
    _, counts = _forward_counting(tiny_model, demo_batch, pruner, monkeypatch)
    assert counts["text_tower"] == 0
    assert counts["cls_attention"] == 0
    _assert_only(pruner.seen, {"last_qkv"})
    assert _clip_layers_run(tiny_model, counts) == [1] * tiny_model.config.vision.num_layers  # once, never twice


def test_litelvlm_calls_the_text_tower_once_per_batch(tiny_model, demo_batch, monkeypatch):
    pruner = recording(LiteLVLM)(num_tokens=64)
    output, counts = _forward_counting(tiny_model, demo_batch, pruner, monkeypatch)
    assert output.visual_tokens_per_layer[0] == 64
    assert counts["text_tower"] == 1
    assert counts["cls_attention"] == 0 and counts["llm_attention"] == 0
    _assert_only(pruner.seen, {"patch_embeds", "text_embeds", "text_mask", "last_qkv"})
    assert _clip_layers_run(tiny_model, counts) == [1] * tiny_model.config.vision.num_layers


def test_vispruner_gets_cls_attention_and_features_only(tiny_model, demo_batch, monkeypatch):
    pruner = recording(VisPruner, stop=True)(num_tokens=64)
    _, counts = _forward_counting(tiny_model, demo_batch, pruner, monkeypatch)
    assert counts["text_tower"] == 0
    assert counts["cls_attention"] == 1
    _assert_only(pruner.seen, {"cls_attention", "patch_features"})
    assert _clip_layers_run(tiny_model, counts) == [1] * (tiny_model.config.vision.num_layers - 1) + [0]


@pytest.fixture(scope="module")
def bf16_model(tiny_model):
    return copy.deepcopy(tiny_model).to(torch.bfloat16)


def test_bfloat16_model_with_float32_scores_upcasts_the_derived_signals(bf16_model, demo_batch):
    seen = capture(bf16_model, demo_batch, SignalRecorder(score_dtype="float32"))
    assert seen.patch_features.dtype == torch.bfloat16
    assert seen.patch_embeds.dtype == torch.float32
    assert seen.text_embeds.dtype == torch.float32
    # patch_embeds are computed in float32 from the bf16 features (weights upcast), not in bf16.
    norm = bf16_model.vision_tower.vision_model.post_layernorm
    normed = F.layer_norm(
        seen.patch_features.float(), norm.normalized_shape, norm.weight.float(), norm.bias.float(), norm.eps
    )
    expected = normed @ bf16_model.vision_tower.visual_projection.weight.float().T
    torch.testing.assert_close(seen.patch_embeds, expected)
    assert torch.isfinite(seen.text_embeds).all()


@pytest.mark.parametrize("pruner", [LiteLVLM(num_tokens=64), FastV(num_tokens=64)], ids=["litelvlm", "fastv"])
def test_bfloat16_forward_on_cpu_gives_finite_masks(bf16_model, demo_batch, pruner):
    with torch.no_grad():
        output = bf16_model(demo_batch, pruner)
    assert [m.shape for m in output.mask_logits] == [m.shape for m in demo_batch.gt_masks]
    for logits in output.mask_logits:
        assert torch.isfinite(logits).all() and bool(logits.abs().max() > 0)
    assert output.visual_tokens_per_layer[-1] == 64
