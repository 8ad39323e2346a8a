"""`text_overflow` on a query of 120 CLIP tokens, against the transformers CLIP text model written out.

`truncate` = LiteLVLM's `truncation=True` (sejong-rcv/LiteLVLM clip_encoder.py:148-151): the first 76
tokens and [EOS] at position 77. `chunk` = CDPruner's (Theia-4869/CDPruner @9541616
clip_encoder.py:81-89): the ids zero-padded to a multiple of 77, reshaped into 77-token rows, each
row through the text tower with its attention mask; the relevance averages over the rows. Then the
run's count of queries over the window (results.json and the console).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from pathlib import Path
from unittest import mock

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from process_helpers import run_in_session

from litelvlm.cli import main
from litelvlm.data.datamodule import ReferringDataModule
from litelvlm.data.synthetic import generate_synthetic_reasonseg
from litelvlm.engine.callbacks.report import EvaluationReport
from litelvlm.engine.module import ReferringSegmentationModule
from litelvlm.engine.scores import MaskScores
from litelvlm.engine.text_overflow import TextOverflowCount, overflow_line, query_lengths
from litelvlm.models.loading import load_assets
from litelvlm.models.tokenizer import tokenize_questions
from litelvlm.pruners import CDPruner, FasterVLM, LiteLVLM, PrunerError, SimilarityOnly
from litelvlm.pruners.base import top_k_indices
from litelvlm.pruners.cdpruner import dpp_greedy_map
from litelvlm.pruners.litelvlm import context_scores

WORDS = "the small red circle left of the big blue square above a green triangle".split()
LONG = " ".join((WORDS * 20)[:118])  # 118 words of the tiny vocabulary: 120 CLIP tokens with [SOS] and [EOS]
WINDOW = 77
DEMO = str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")


@pytest.fixture(scope="module")
def full_ids(tiny_model):
    ids = tiny_model.clip_tokenizer(LONG, verbose=False)["input_ids"]
    assert len(ids) == 120
    return ids


@torch.no_grad()
def reference_chunks(tower, ids: list[int]) -> torch.Tensor:
    """CDPruner's `forward` text branch for one string: pad ids and mask with zeros to 77 * segments, reshape, embed."""
    input_ids = torch.tensor([ids])
    segments = (input_ids.shape[1] - 1) // WINDOW + 1
    padding = WINDOW * segments - input_ids.shape[1]
    inputs = {
        key: torch.cat([value, value.new_zeros((1, padding))], dim=1).reshape(-1, WINDOW)
        for key, value in {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}.items()
    }
    return tower(**inputs).text_embeds.float()


@torch.no_grad()
def sample_zero_texts(model, batch, full_ids) -> torch.Tensor:
    """Sample 0's text slots written out: the long query's two chunks, then its other questions alone."""
    others = [model.text_tower(input_ids=model.clip_tokenizer(q, return_tensors="pt")["input_ids"]).text_embeds.float()
              for q in batch.questions[0][1:]]
    return torch.cat([reference_chunks(model.text_tower, full_ids), *others])


# ------------------------------------------------------------------------------- tokenisation
def test_truncate_is_the_tokenizers_own_truncation(tiny_model, full_ids):
    clip = tiny_model.clip_tokenizer
    input_ids, attention_mask, text_mask = tokenize_questions(clip, [[LONG]], overflow="truncate")
    expected = clip(LONG, truncation=True, max_length=WINDOW)["input_ids"]
    assert input_ids[0, 0].tolist() == expected == full_ids[:76] + [clip.eos_token_id]
    assert attention_mask.all() and text_mask.tolist() == [[True]]


def test_chunk_cuts_77_token_rows_each_its_own_slot(tiny_model, full_ids):
    clip = tiny_model.clip_tokenizer
    short = "the red circle"
    input_ids, attention_mask, text_mask = tokenize_questions(clip, [[short, LONG], [short]], overflow="chunk")
    assert input_ids.shape == (2, 3, WINDOW)
    assert text_mask.tolist() == [[True, True, True], [True, False, False]]
    short_ids = clip(short)["input_ids"]
    assert input_ids[0, 0, : len(short_ids)].tolist() == short_ids
    # The first chunk holds [SOS] and 76 content tokens, no [EOS]; the second the other 42 and [EOS].
    assert input_ids[0, 1].tolist() == full_ids[:77] and clip.eos_token_id not in full_ids[:77]
    assert input_ids[0, 2, :43].tolist() == full_ids[77:] and full_ids[77] != clip.bos_token_id
    assert attention_mask[0, 1].tolist() == [1] * 77
    assert attention_mask[0, 2].tolist() == [1] * 43 + [0] * 34


def test_unknown_overflow_is_a_clear_error(tiny_model):
    with pytest.raises(PrunerError, match="text_overflow must be 'truncate' or 'chunk', got 'drop'"):
        LiteLVLM(text_overflow="drop")
    with pytest.raises(PrunerError, match="text_overflow"):
        CDPruner(text_overflow="drop")
    with pytest.raises(PrunerError, match="text_overflow"):
        tiny_model.encode_text([["dog"]], "eos", "drop")


# ------------------------------------------------------------------------------- embeddings
@torch.no_grad()
def test_truncate_equals_the_first_77_tokens_with_eos_at_77(tiny_model, full_ids):
    embeds, mask = tiny_model.encode_text([[LONG]], "eos", "truncate")
    eos = tiny_model.clip_tokenizer.eos_token_id
    expected = tiny_model.text_tower(input_ids=torch.tensor([full_ids[:76] + [eos]])).text_embeds.float()
    assert embeds.shape[:2] == (1, 1) and mask.tolist() == [[True]]
    torch.testing.assert_close(embeds[0], expected, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_chunk_equals_the_references_chunks(tiny_model, full_ids):
    embeds, mask = tiny_model.encode_text([[LONG], ["the red circle"]], "eos", "chunk")
    tower = tiny_model.text_tower
    expected = reference_chunks(tower, full_ids)
    assert expected.shape[0] == 2 and mask.tolist() == [[True, True], [True, False]]
    torch.testing.assert_close(embeds[0], expected, rtol=1e-5, atol=1e-6)
    # The first chunk has no [EOS]: the tower pools its position 0, the [SOS] alone (causal attention),
    # the same vector for every long query; the second chunk's [EOS] sees only the last 42 tokens.
    sos_alone = tower(input_ids=torch.tensor([[tiny_model.clip_tokenizer.bos_token_id]])).text_embeds.float()
    torch.testing.assert_close(embeds[0, :1], sos_alone, rtol=1e-5, atol=1e-6)
    tail = tower(input_ids=torch.tensor([full_ids[77:]])).text_embeds.float()
    torch.testing.assert_close(embeds[0, 1:], tail, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_chunk_mean_pooling_leaves_out_sos_and_eos_of_each_chunk(tiny_model, full_ids):
    embeds, _ = tiny_model.encode_text([[LONG]], "mean", "chunk")
    tower = tiny_model.text_tower
    for slot, (ids, content) in enumerate([(full_ids[:77], slice(1, 77)), (full_ids[77:], slice(0, 42))]):
        states = tower(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0, content]
        expected = tower.text_projection(tower.text_model.final_layer_norm(states.mean(0))).float()
        torch.testing.assert_close(embeds[0, slot], expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------- the pruners
@pytest.fixture(scope="module")
def long_batch(demo_batch):
    """The demo batch (2 images, 3 questions each) with the 120-token query as sample 0's first question
    (only CLIP reads the question strings; the prompts stay as they are)."""
    return dataclasses.replace(demo_batch, questions=[[LONG, *demo_batch.questions[0][1:]], list(demo_batch.questions[1])])


@torch.no_grad()
def test_litelvlm_chunk_gives_each_chunk_its_own_sentence_budget(tiny_model, long_batch, full_ids):
    budget = 64
    pruner = LiteLVLM(num_tokens=budget, text_overflow="chunk", score_dtype="float32")
    shared = tiny_model.encode(long_batch, [pruner], for_grounding=False)
    signals = shared.signals_by_score_dtype["float32"]
    texts = sample_zero_texts(tiny_model, long_batch, full_ids)  # [4, P]: 2 chunks + 2 questions
    similarity = signals.patch_embeds[0].float() @ texts.T  # [N, 4]
    per_sentence = budget // 4  # T = 4: each chunk is a sentence
    picks = [top_k_indices(similarity[:, t], per_sentence, largest=False) for t in range(4)]
    similarity_set = torch.unique(torch.cat(picks))
    context = context_scores(*(x[:1] for x in signals.last_qkv))[0]
    ranking = top_k_indices(context, len(context))
    fill = ranking[~torch.isin(ranking, similarity_set)][: budget - len(similarity_set)]
    kept, groups = pruner.select_with_groups(
        dataclasses.replace(signals, text_embeds=shared.text_embeds["question", "eos", "chunk"][0],
                            text_mask=shared.text_embeds["question", "eos", "chunk"][1])
    )
    assert kept[0].tolist() == torch.cat([fill, similarity_set]).tolist()
    assert groups[0].tolist() == [1] * len(fill) + [0] * len(similarity_set)


@torch.no_grad()
def test_the_model_hands_each_pruner_its_overflow(tiny_model, long_batch):
    chunked = SimilarityOnly(num_tokens=48, text_overflow="chunk")
    output = tiny_model.ground(long_batch, tiny_model.encode(long_batch, [chunked]), chunked)
    direct, direct_mask = tiny_model.encode_text(long_batch.questions, "eos", "chunk")
    assert direct_mask.tolist() == [[True, True, True, True], [True, True, True, False]]
    shared = tiny_model.encode(long_batch, [chunked], for_grounding=False)
    signals = dataclasses.replace(shared.signals, text_embeds=direct, text_mask=direct_mask)
    assert output.kept_indices.tolist() == chunked.select(signals).tolist()


@torch.no_grad()
def test_cdpruner_averages_the_relevance_over_the_chunks(tiny_model, long_batch, full_ids):
    pruner = CDPruner(num_tokens=48)
    assert pruner.text_overflow == "chunk" and LiteLVLM().text_overflow == "truncate"  # each reference's default
    shared = tiny_model.encode(long_batch, [pruner], for_grounding=False)
    signals = shared.signals_by_score_dtype["model"]
    text, mask = shared.text_embeds["question", "eos", "chunk"]
    features, patch_embeds = signals.projected_features[0], signals.patch_embeds[0].float()
    chunks = sample_zero_texts(tiny_model, long_batch, full_ids)
    # llava_arch.py:151-167 written out for sample 0, M = 4 text slots (2 chunks, 2 other questions).
    image = features / features.norm(dim=-1, keepdim=True)
    similarity = image.float() @ image.float().T
    cos = (patch_embeds / patch_embeds.norm(dim=-1, keepdim=True)) @ (chunks / chunks.norm(dim=-1, keepdim=True)).T
    rel = (-cos).mean(dim=-1)
    rel = (rel - rel.min() + 1e-6) / (rel.max() - rel.min())
    expected = sorted(dpp_greedy_map(rel[:, None] * similarity * rel[None, :], 48).tolist())
    kept = pruner.select(dataclasses.replace(signals, text_embeds=text, text_mask=mask))
    assert kept[0].tolist() == expected


@torch.no_grad()
def test_a_sweep_embeds_each_source_pooling_overflow_once(tiny_model, long_batch):
    pruners = [LiteLVLM(num_tokens=64), LiteLVLM(num_tokens=64, text_overflow="chunk"),
               SimilarityOnly(num_tokens=64, text_overflow="chunk"), CDPruner(num_tokens=64),
               CDPruner(num_tokens=32, text_overflow="truncate")]
    calls = []
    tiny_model.stage_observer = lambda name: calls.append(name) or contextlib.nullcontext()
    try:
        shared = tiny_model.encode(long_batch, pruners, for_grounding=False)
    finally:
        tiny_model.stage_observer = None
    assert list(shared.text_embeds) == [("question", "eos", "truncate"), ("question", "eos", "chunk")]
    assert calls.count("clip_text") == 2
    assert shared.text_embeds["question", "eos", "chunk"][0].shape[1] == 4
    assert shared.text_embeds["question", "eos", "truncate"][0].shape[1] == 3


# ------------------------------------------------------------------------------- the count
def test_overflow_count_by_hand(tiny_model, full_ids):
    count = TextOverflowCount(WINDOW)
    count.update([10, 77, 78])
    count.update([120])
    count.update([])
    assert count.compute() == {"window": 77, "queries": 4, "overflowed": 2, "longest": 120}
    assert query_lengths(tiny_model.clip_tokenizer, [[LONG, "dog"], []]) == [120, 3]


def test_a_run_reports_the_overflowed_queries(tmp_path, long_batch, capsys):
    """A sweep over the batch: the text-guided rows carry their text source's count, the console one line."""
    module = ReferringSegmentationModule(pruners=[
        LiteLVLM(num_tokens=64), CDPruner(num_tokens=64), LiteLVLM(num_tokens=64, text_source="expression"),
        FasterVLM(num_tokens=64),  # reads no text: no count in its row
    ])
    trainer = L.Trainer(logger=False, callbacks=[EvaluationReport()], enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu", devices=1)
    trainer.validate(module, dataloaders=DataLoader([long_batch], batch_size=None, collate_fn=lambda item: item))
    rows = {row["configuration"]: row for row in json.loads((tmp_path / "results.json").read_text())}
    questions = {"window": 77, "queries": 6, "overflowed": 1, "longest": 120, "text_source": "question"}
    assert rows["litelvlm@64[text_source=question]"]["clip_text_overflow"] == questions
    assert rows["cdpruner@64"]["clip_text_overflow"] == questions
    assert rows["cdpruner@64"]["text_overflow"] == "chunk"
    expressions = rows["litelvlm@64[text_source=expression]"]["clip_text_overflow"]
    assert expressions["overflowed"] == 0 and expressions["queries"] == 6 and expressions["text_source"] == "expression"
    assert "clip_text_overflow" not in rows["fastervlm@64"]
    line = overflow_line(list(rows.values()))
    assert line in capsys.readouterr().out
    assert line.startswith("queries longer than CLIP's 77-token text window: val questions: 1 of 6 (longest 120)")
    assert "truncate: litelvlm@64[text_source=question], litelvlm@64[text_source=expression]; chunk: cdpruner@64" in line


def test_a_resume_adds_the_recorded_queries_once():
    """Scores read back from records carry each mask's CLIP lengths; the first configuration's are counted."""
    module = ReferringSegmentationModule(pruners=[LiteLVLM(num_tokens=64), CDPruner(num_tokens=64)])
    module.overflow_counts["0:question"].update([10, 90])  # what this attempt evaluated
    one = torch.ones(3, dtype=torch.int64)
    recorded = {"question": torch.tensor([120, 20, -1]), "expression": torch.tensor([5, 6, 7])}
    for name in module.configuration_names:  # the records callback restores every configuration
        module.restore_scores("val", name, MaskScores(one, one, one, None, recorded))
    count = module._overflow(0, module.pruners[0])["clip_text_overflow"]
    assert count == {"window": 77, "queries": 4, "overflowed": 2, "longest": 120, "text_source": "question"}


def test_cli_flag_selects_the_chunked_text(tmp_path, capsys):
    with mock.patch.object(sys, "argv", ["litelvlm.cli"]):
        main(["validate", "--config", DEMO, "--model.pruner.text_overflow", "chunk", "--trainer.limit_val_batches", "1",
              "--data.max_sentences", "1", "--trainer.enable_progress_bar", "false",
              "--trainer.logger.init_args.save_dir", str(tmp_path)])
    (found,) = tmp_path.rglob("results.json")
    results = json.loads(found.read_text())
    assert (results["pruner"], results["text_overflow"]) == ("litelvlm", "chunk")
    count = results["clip_text_overflow"]
    assert (count["queries"], count["overflowed"], count["window"]) == (2, 0, 77)  # 2 images, 1 short question each
    assert "queries longer than CLIP's 77-token text window: val questions: 0 of 2" in capsys.readouterr().out


def test_two_processes_count_every_query_once(tmp_path):
    """DDP on a ReasonSeg folder whose first image asks the long query: the count is summed over the ranks."""
    folder = generate_synthetic_reasonseg(tmp_path / "data", {"val": 5})
    first = sorted((folder / "val").glob("*.json"))[0]
    first.write_text(json.dumps({**json.loads(first.read_text()), "text": [LONG], "is_sentence": True}))
    data = ReferringDataModule(dataset="reasonseg", data_dir=str(folder), split="val", batch_size=2)
    data.setup()
    questions = [question for batch in data.val_dataloader() for question in batch.questions]
    lengths = query_lengths(load_assets("tiny-glamm").clip_tokenizer, questions)
    assert len(lengths) == 5 and max(lengths) > WINDOW >= sorted(lengths)[-2]  # one query overflows
    save_dir = tmp_path / "logs"
    command = [
        sys.executable, "-m", "litelvlm.cli", "validate", "--config", DEMO, "--data.dataset", "reasonseg",
        "--data.data_dir", str(folder), "--data.split", "val", "--data.batch_size", "1",
        "--model.pruner.text_overflow", "chunk", "--trainer.accelerator", "cpu", "--trainer.devices", "2",
        "--trainer.strategy", "ddp", "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(save_dir),
    ]  # fmt: skip
    done = run_in_session(command, tmp_path, 400)
    assert done.returncode == 0, done.stderr[-4000:]
    (found,) = save_dir.rglob("results.json")
    results = json.loads(found.read_text())
    assert results["num_samples"] == 5
    assert results["clip_text_overflow"] == {"window": 77, "queries": 5, "overflowed": 1, "longest": max(lengths),
                                             "text_source": "question"}
