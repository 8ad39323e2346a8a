"""`score_dtype`: with a bf16 model, `model` scores exactly as the references do (every op in bf16, in
their order), written out here from the plain transformers modules; `float32` is the upcast computation.

References: LiteLVLM sejong-rcv/LiteLVLM `model/llava/model/multimodal_encoder/clip_encoder.py`
(`sim_aware_pruning`, `ctx_aware_pruning`); VisPruner Theia-4869/VisPruner `llava/model/llava_arch.py`
(`encode_images`) reading transformers 4.37's eager CLIP attention; FastV pkunlp-icler/FastV
`src/transformers/src/transformers/models/llama/modeling_llama.py` (eager attention, head mean).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from litelvlm.engine.sweep import SweepError, SweepGrid, configuration_names
from litelvlm.models.lvlm import PixelGroundingLVLM
from litelvlm.pruners import ContextOnly, FastV, LiteLVLM, PrunerError, Signal, SimilarityOnly, TokenPruner, VisPruner

BF16 = torch.bfloat16
R = 48


class _Recorder(TokenPruner):
    """Declares every pre-LLM signal and keeps what the model hands over."""

    def __init__(self, score_dtype: str) -> None:
        super().__init__(num_tokens=None, score_dtype=score_dtype)
        self.seen = None

    @property
    def required_signals(self):
        return frozenset(Signal) - {Signal.LLM_ATTENTION}

    def select(self, signals):
        self.seen = signals
        return torch.arange(signals.num_patches).expand(signals.batch_size, -1).clone()


@pytest.fixture(scope="module")
def bf16_model(tiny_model):
    return copy.deepcopy(tiny_model).to(BF16)


@pytest.fixture(scope="module")
def seen(bf16_model, demo_batch):
    """The signals a bf16 model hands a `model` and a `float32` pruner, from one shared encode."""
    recorders = {dtype: _Recorder(dtype) for dtype in ("model", "float32")}
    with torch.no_grad():
        shared = bf16_model.encode(demo_batch, list(recorders.values()), for_grounding=False)
    views = {}
    for dtype, recorder in recorders.items():
        signals = copy.copy(shared.signals_by_score_dtype[dtype])
        signals.text_embeds, signals.text_mask = shared.text_embeds[("question", "eos", "truncate")]
        views[dtype] = signals
    return views


@pytest.fixture(scope="module")
def clip_reference(bf16_model, demo_batch):
    """A plain bf16 transformers forward: select-layer hidden states and the select layer's q/k."""
    tower = bf16_model.vision_tower
    layer = tower.vision_model.encoder.layers[-2].self_attn
    captured = {}
    handles = [m.register_forward_hook(lambda m, a, out, n=n: captured.__setitem__(n, out))
               for n, m in (("q", layer.q_proj), ("k", layer.k_proj))]
    try:
        with torch.no_grad():
            out = tower(pixel_values=demo_batch.clip_pixel_values.to(BF16), output_hidden_states=True)
    finally:
        for handle in handles:
            handle.remove()
    return out.hidden_states[-2], captured


def _stable_order(scores: torch.Tensor, descending: bool) -> torch.Tensor:
    return torch.sort(scores, dim=-1, descending=descending, stable=True).indices


# ------------------------------------------------------------------ the signals the model derives


def test_model_dtype_signals_are_the_bf16_modules_and_transformers_437_attention(bf16_model, seen, clip_reference):
    hidden, qk = clip_reference
    tower = bf16_model.vision_tower
    model_view, float_view = seen["model"], seen["float32"]
    with torch.no_grad():
        # LiteLVLM: post_layernorm and visual_projection in bf16 (autocast off).
        embeds = tower.visual_projection(tower.vision_model.post_layernorm(hidden[:, 1:]))
        # transformers 4.37 CLIPAttention: q_proj(x) * head_dim**-0.5, bmm, softmax, all in bf16.
        b, length, width = qk["k"].shape
        heads = bf16_model.config.vision.num_heads
        head_dim = width // heads
        q = (qk["q"] * head_dim**-0.5).view(b, length, heads, head_dim).transpose(1, 2).reshape(b * heads, length, head_dim)
        k = qk["k"].view(b, length, heads, head_dim).transpose(1, 2).reshape(b * heads, length, head_dim)
        attention = torch.bmm(q, k.transpose(1, 2)).softmax(-1).view(b, heads, length, length)[:, :, 0, 1:]
    assert model_view.score_dtype == "model" and float_view.score_dtype == "float32"
    assert model_view.patch_embeds.dtype == BF16 and model_view.cls_attention.dtype == BF16
    assert torch.equal(model_view.patch_embeds, embeds)
    assert torch.equal(model_view.cls_attention, attention)
    # float32: today's upcast computation, which rounds differently.
    assert float_view.patch_embeds.dtype == torch.float32 and float_view.cls_attention.dtype == torch.float32
    assert not torch.equal(float_view.patch_embeds, embeds.float())
    # The CLIP tensors themselves are shared, not recomputed per precision.
    assert model_view.patch_features is float_view.patch_features and model_view.last_qkv is float_view.last_qkv


# ------------------------------------------------------------------ LiteLVLM and its ablations


def _litelvlm_bf16(signals, budget: int, fill_by: str = "context") -> list[list[int]]:
    """LiteLVLM as its reference computes it in bf16: one matmul for the similarities, the context
    score op for op, lowest R // T per sentence, their sorted union, then the fill."""
    kept = []
    for b in range(signals.batch_size):
        text = signals.text_embeds[b][signals.text_mask[b]].to(BF16)  # exact: bf16 values upcast
        similarity = torch.matmul(signals.patch_embeds[b : b + 1], text.unsqueeze(-1)).squeeze(-1)  # [T, N]
        lowest = _stable_order(similarity, descending=False)[:, : budget // len(text)]
        chosen = torch.unique(lowest.flatten()).tolist()
        if fill_by == "context":
            q, k, v = (x[b : b + 1] for x in signals.last_qkv)
            q_norm, k_norm = F.normalize(q[:, :1], dim=-1), F.normalize(k[:, 1:], dim=-1)
            weights = F.softmax(torch.matmul(q_norm, k_norm.transpose(-2, -1)) / q.shape[-1] ** 0.5, dim=-1)
            ranking = _stable_order((weights.transpose(1, 2) * v[:, 1:]).norm(dim=-1)[0], descending=True)
        else:
            ranking = _stable_order(similarity.min(dim=0).values, descending=False)
        fill = [i for i in ranking.tolist() if i not in chosen][: budget - len(chosen)]
        kept.append(fill + chosen)
    return kept


def _litelvlm_float32(signals, budget: int, fill_by: str = "context") -> list[list[int]]:
    """Today's float32 computation: everything upcast before the first op."""
    similarity = torch.einsum("bnp,btp->btn", signals.patch_embeds.float(), signals.text_embeds.float())
    context = _float_context(signals)
    kept = []
    for b in range(signals.batch_size):
        sample = similarity[b][signals.text_mask[b]]  # [T, N]
        lowest = _stable_order(sample, descending=False)[:, : budget // len(sample)]
        chosen = torch.unique(lowest.flatten()).tolist()
        if fill_by == "context":
            ranking = _stable_order(context[b], descending=True)
        else:
            ranking = _stable_order(sample.min(dim=0).values, descending=False)
        fill = [i for i in ranking.tolist() if i not in chosen][: budget - len(chosen)]
        kept.append(fill + chosen)
    return kept


@pytest.mark.parametrize("cls, fill_by", [(LiteLVLM, "context"), (SimilarityOnly, "min_similarity")])
def test_litelvlm_model_scores_in_bf16_and_float32_upcasts(seen, cls, fill_by):
    model_kept = cls(num_tokens=R, score_dtype="model").select(seen["model"])
    float_kept = cls(num_tokens=R, score_dtype="float32").select(seen["float32"])
    assert model_kept.tolist() == _litelvlm_bf16(seen["model"], R, fill_by)
    assert float_kept.tolist() == _litelvlm_float32(seen["float32"], R, fill_by)
    assert model_kept.tolist() != float_kept.tolist()  # on this model the precision changes the selection


def test_context_only_model_ranks_the_bf16_context_score(seen):
    signals = seen["model"]
    q, k, v = signals.last_qkv
    assert q.dtype == BF16
    q_norm, k_norm = F.normalize(q[:, :1], dim=-1), F.normalize(k[:, 1:], dim=-1)
    weights = F.softmax(torch.matmul(q_norm, k_norm.transpose(-2, -1)) / q.shape[-1] ** 0.5, dim=-1)
    scores = (weights.transpose(1, 2) * v[:, 1:]).norm(dim=-1)
    assert scores.dtype == BF16
    kept = ContextOnly(num_tokens=R, score_dtype="model").select(signals)
    assert kept.tolist() == _stable_order(scores, descending=True)[:, :R].tolist()
    # bf16 rounding makes ties, which the float32 score mostly separates: the two rankings differ.
    float_scores = ContextOnly(num_tokens=R, score_dtype="float32")
    assert not torch.equal(scores.float(), _float_context(signals))
    assert float_scores.select(seen["float32"]).tolist() == _stable_order(_float_context(signals), True)[:, :R].tolist()


def _float_context(signals) -> torch.Tensor:
    q, k, v = (x.float() for x in signals.last_qkv)
    logits = torch.einsum("bd,bnd->bn", F.normalize(q[:, 0], dim=-1), F.normalize(k[:, 1:], dim=-1)) / math.sqrt(q.shape[-1])
    return (logits.softmax(-1)[..., None] * v[:, 1:]).norm(dim=-1)


# ------------------------------------------------------------------ VisPruner


def _vispruner_reference(attention: torch.Tensor, features: torch.Tensor, budget: int) -> list[list[int]]:
    """VisPruner's `encode_images` with a stable sort, in the dtype of its inputs: head mean,
    x / ||x||, rounds of A-to-B cosines; kept in raster order."""
    important_count = budget // 2
    mean = attention.mean(dim=1)
    normalized = features / features.norm(dim=-1, keepdim=True)
    kept = []
    for b in range(attention.shape[0]):
        order = _stable_order(mean[b], descending=True)
        important, residual = order[:important_count], order[important_count:]
        diverse = budget - important_count
        while residual.shape[0] > diverse:
            remove = min(8, residual.shape[0] - diverse, (residual.shape[0] + 1) // 2)
            a, b_part = residual[::2], residual[1::2]
            scores = (normalized[b, a] @ normalized[b, b_part].T).max(dim=-1).values
            residual = torch.cat([a[_stable_order(scores, descending=True)[remove:]], b_part])
        kept.append(sorted(important.tolist() + residual.tolist()))
    return kept


def test_vispruner_model_scores_in_bf16_and_float32_upcasts(seen):
    model_view, float_view = seen["model"], seen["float32"]
    model_kept = VisPruner(num_tokens=R, score_dtype="model").select(model_view)
    float_kept = VisPruner(num_tokens=R, score_dtype="float32").select(float_view)
    assert model_view.patch_features.dtype == BF16
    assert model_kept.tolist() == _vispruner_reference(model_view.cls_attention, model_view.patch_features, R)
    expected = _vispruner_reference(float_view.cls_attention, float_view.patch_features.float(), R)
    assert float_kept.tolist() == expected
    assert model_kept.tolist() != float_kept.tolist()


# ------------------------------------------------------------------ FastV


@pytest.fixture(scope="module")
def llm_layer_inputs(bf16_model):
    """A bf16 LLM layer and a random bf16 sequence of 20 tokens, the last 2 of sample 1 padding."""
    layer = bf16_model.llm.model.layers[1]
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 20, bf16_model.config.llm.hidden_size, generator=generator).to(BF16)
    positions = torch.arange(20).expand(2, 20)
    embeddings = bf16_model.llm.model.rotary_emb(hidden, position_ids=positions)
    key_mask = torch.ones(2, 20, dtype=torch.long)
    key_mask[1, -2:] = 0
    visual = torch.arange(3, 15).expand(2, 12)
    return layer, hidden, embeddings, key_mask, visual


def _fastv_reference(layer, hidden, embeddings, key_mask, visual, score_dtype):
    """FastV's eager LLaMA attention of the last real token, head mean (model: bf16 with a float32
    softmax cast back; float32: all upcast)."""
    attn = layer.self_attn
    rows = []
    for b in range(hidden.shape[0]):
        length = int(key_mask[b].sum())
        x = layer.input_layernorm(hidden[b : b + 1, :length])
        heads, head_dim = attn.config.num_attention_heads, attn.head_dim
        q = attn.q_proj(x).view(1, length, heads, head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(1, length, -1, head_dim).transpose(1, 2)
        cos, sin = (e[b : b + 1, :length] for e in embeddings)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if score_dtype == "model":
            weights = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(head_dim)
            probs = F.softmax(weights, dim=-1, dtype=torch.float32).to(q.dtype)
        else:
            probs = ((q.float() @ k.float().transpose(2, 3)) * head_dim**-0.5).softmax(-1)
        rows.append(torch.mean(probs, dim=1)[0, -1][visual[b]])
    return torch.stack(rows)


@pytest.mark.parametrize("score_dtype", ["model", "float32"])
def test_fastv_attention_row_and_selection_in_each_score_dtype(llm_layer_inputs, score_dtype):
    with torch.no_grad():
        row = PixelGroundingLVLM._last_token_attention(*llm_layer_inputs, score_dtype)
        expected = _fastv_reference(*llm_layer_inputs, score_dtype)
    assert row.dtype == (BF16 if score_dtype == "model" else torch.float32)
    assert torch.equal(row, expected)
    kept = FastV(num_tokens=5, score_dtype=score_dtype).select_in_llm(row)
    assert kept.tolist() == _stable_order(expected.float(), descending=True)[:, :5].sort(dim=-1).values.tolist()


def test_the_decoder_computes_fastvs_row_in_the_pruners_score_dtype(bf16_model, demo_batch):
    class Recording(FastV):
        def select_in_llm(self, attention):
            self.row = attention
            return super().select_in_llm(attention)

    rows = {}
    for score_dtype in ("model", "float32"):
        pruner = Recording(num_tokens=R, score_dtype=score_dtype)
        with torch.no_grad():
            bf16_model(demo_batch, pruner)
        rows[score_dtype] = pruner.row
    assert rows["model"].dtype == BF16 and rows["float32"].dtype == torch.float32
    assert not torch.equal(rows["model"].float(), rows["float32"])
    torch.testing.assert_close(rows["model"].float(), rows["float32"], atol=2e-2, rtol=5e-2)


# ------------------------------------------------------------------ the knob


def test_score_dtype_is_checked_named_and_swept():
    assert LiteLVLM().score_dtype == "model" and VisPruner().score_dtype == "model" and FastV().score_dtype == "model"
    assert LiteLVLM(score_dtype="float32").hparams()["score_dtype"] == "float32"
    with pytest.raises(PrunerError, match="score_dtype must be 'model' or 'float32', got 'bf16'"):
        VisPruner(score_dtype="bf16")
    pruners = SweepGrid(strategies=["litelvlm", "random"], budgets=[64], score_dtypes=["model", "float32"]).expand()
    assert [(p.name, p.score_dtype) for p in pruners] == [
        ("litelvlm", "model"), ("litelvlm", "float32"), ("random", "model")
    ]
    assert configuration_names(pruners) == [
        "litelvlm@64[score_dtype=model]", "litelvlm@64[score_dtype=float32]", "random@64"
    ]
    with pytest.raises(SweepError, match="score_dtypes must list 'model' and/or 'float32' once each"):
        SweepGrid(strategies=["fastv"], budgets=[8], score_dtypes=["fp16"]).expand()
    with pytest.raises(SweepError, match="sets score_dtype; the grid's score_dtypes set it"):
        SweepGrid(strategies=[{"class_path": "fastv", "init_args": {"score_dtype": "model"}}], budgets=[8],
                  score_dtypes=["float32"]).expand()
