"""The text attention sink study: shares against a direct reading of the attentions, and the config end to end."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from litelvlm.analysis.attention_sink import eager_copy, measure_questions, sos_is_largest, summarise, summary_lines

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = [
    "please segment the player wearing green cleats",
    "the dog",
    "Can you segment the man in red in this image?",
]


def test_sink_shares_equal_a_direct_reading_of_every_layer_and_head(tiny_model):
    tower = tiny_model.text_tower
    measured = measure_questions(eager_copy(tower), tiny_model.clip_tokenizer, QUESTIONS)
    assert tower.config._attn_implementation == "sdpa"  # the model's own tower is left as it was

    direct = copy.deepcopy(tower)
    direct.set_attn_implementation("eager")
    for q, question in enumerate(QUESTIONS):  # one question at a time: no padding at all
        ids = tiny_model.clip_tokenizer(question, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            attentions = direct(input_ids=ids, output_attentions=True).attentions
        eos = ids.shape[1] - 1
        assert measured["eos_positions"][q] == eos
        for layer, attention in enumerate(attentions):
            for head in range(attention.shape[1]):
                row = attention[0, head, eos].double()
                expected = {
                    "sos": float(row[0]),
                    "content": float(row[1:eos].sum()),
                    "self": float(row[eos]),
                    "entropy": -sum(float(p) * math.log(float(p)) for p in row if p > 0),
                }
                for measure, value in expected.items():
                    got = float(measured["shares"][measure][q, layer, head])
                    assert got == pytest.approx(value, abs=1e-6), (question, layer, head, measure)
                assert bool(measured["sos_is_largest"][q, layer, head]) == (int(row.argmax()) == 0)
            mean_row = attention[0, :, eos].double().mean(0)
            assert bool(measured["sos_is_largest_head_mean"][q, layer]) == (int(mean_row.argmax()) == 0)
        head_mean = attentions[-1][0, :, eos].double().mean(0).tolist()
        assert measured["last_layer_eos_row"][q] == pytest.approx(head_mean, abs=1e-6)
    total = measured["shares"]["sos"] + measured["shares"]["content"] + measured["shares"]["self"]
    torch.testing.assert_close(total, torch.ones_like(total), atol=1e-6, rtol=0)


def eos_rows_as_attentions(rows: list[list[list[list[float]]]], eos: list[int]) -> list[torch.Tensor]:
    """Per-layer attentions [Q, H, S, S] whose [EOS] rows are `rows[q][layer][head]` (the rest zero)."""
    num_q, num_layers, num_heads, length = len(rows), len(rows[0]), len(rows[0][0]), len(rows[0][0][0])
    attentions = [torch.zeros(num_q, num_heads, length, length) for _ in range(num_layers)]
    for q in range(num_q):
        for layer in range(num_layers):
            attentions[layer][q, :, eos[q]] = torch.tensor(rows[q][layer])
    return attentions


def test_sos_is_largest_against_hand_reading():
    rows = [
        [[[0.5, 0.2, 0.2, 0.1], [0.1, 0.6, 0.2, 0.1]],  # q0 layer 0: yes, no; head mean [.3 .4 .2 .1]: no
         [[0.4, 0.3, 0.2, 0.1], [0.4, 0.1, 0.1, 0.4]]],  # layer 1: yes, tie (counts for [SOS]); mean: yes
        [[[0.2, 0.3, 0.5, 0.0], [0.7, 0.2, 0.1, 0.0]],  # q1 ([EOS] at 2) layer 0: no, yes; mean [.45 .25 .3]: yes
         [[0.1, 0.1, 0.8, 0.0], [0.3, 0.3, 0.4, 0.0]]],  # layer 1: no, no; mean: no
    ]
    per_head, head_mean = sos_is_largest(eos_rows_as_attentions(rows, [3, 2]), torch.tensor([3, 2]))
    assert per_head.tolist() == [[[True, False], [True, True]], [[False, True], [False, False]]]
    assert head_mean.tolist() == [[False, True], [True, False]]


def hand_row(sample_id: int, sentence: int, last_head_mean: bool, per_head: list[list[bool]], sos: list[list[float]]):
    other = [[0.0] * 2 for _ in range(2)]
    return {"split": "val", "sample_id": sample_id, "sentence": sentence,
            "shares": {"sos": sos, "content": other, "self": other, "entropy": other},
            "sos_is_largest": per_head, "sos_is_largest_head_mean": [False, last_head_mean]}


def test_sink_rates_match_hand_counts_with_sample_bootstrap_intervals():
    # Four questions over three samples (0: two questions, 1 and 2: one each), 2 layers x 2 heads.
    rows = [
        hand_row(0, 0, True, [[True, False], [True, True]], [[0.9, 0.1], [0.8, 0.6]]),
        hand_row(0, 1, True, [[False, False], [True, False]], [[0.2, 0.1], [0.6, 0.2]]),
        hand_row(1, 0, False, [[False, True], [False, False]], [[0.1, 0.7], [0.3, 0.1]]),
        hand_row(2, 0, True, [[True, False], [True, True]], [[0.9, 0.1], [0.9, 0.5]]),
    ]
    summary = summarise(rows, bootstrap_resamples=2000, seed=1)
    rate = summary["sos_largest_rate"]
    assert [stats["mean"] for stats in rate["head_mean"]] == [0.0, 0.75]
    assert rate["per_head"]["mean"] == [[0.5, 0.25], [0.75, 0.5]]
    last = rate["head_mean"][-1]
    assert last["n"] == 4 and last["groups"] == 3
    # Resampling samples: three copies of sample 1 give 0 (p = 1/27 > 2.5%), none of it gives 1.
    assert last["low"] == 0.0 and last["high"] == 1.0
    assert rate["head_mean"][0]["low"] == rate["head_mean"][0]["high"] == 0.0
    share = summary["sos_share_last_layer_head_mean"]
    assert share["mean"] == pytest.approx((0.7 + 0.4 + 0.2 + 0.7) / 4)
    lines = summary_lines(summary)
    assert "largest weight on [SOS] for 75% (95% CI 0-100%)" in lines[1]
    assert lines[3].endswith("0: 0%, 1: 75%")


def test_attention_sink_config_runs_end_to_end(tmp_path, tiny_model, capsys):
    from litelvlm.cli import main

    main(["validate", "--config", str(REPO / "configs/studies/attention_sink.yaml"), "--trainer.limit_val_batches", "2",
          "--trainer.logger.init_args.save_dir", str(tmp_path)])
    [path] = tmp_path.rglob("attention_sink.json")
    report = json.loads(path.read_text())
    layers, heads = tiny_model.config.text.num_layers, tiny_model.config.text.num_heads
    keys = [(row["sample_id"], row["sentence"]) for row in report["rows"]]
    assert keys == sorted(set(keys)) and report["num_questions"] == len(keys) > 0
    for measure in ("sos", "content", "self", "entropy"):
        assert len(report["mean"][measure]) == layers and len(report["mean"][measure][0]) == heads
        assert len(report["std"][measure]) == layers
    first = report["rows"][0]
    assert first["tokens"][0] == "<|startoftext|>" and first["tokens"][-1] == "<|endoftext|>"
    assert len(first["last_layer_eos_row"]) == len(first["tokens"])
    pngs = ["attention_sink_sos_heatmap.png", *(f"attention_sink_example_{i}.png" for i in range(3))]
    for name in pngs:
        with Image.open(path.parent / name) as image:
            assert image.size[0] > 100 and image.size[1] > 100
    assert not (path.parent / "attention_sink_example_3.png").exists()
    rate = report["sos_largest_rate"]
    assert len(rate["head_mean"]) == layers and len(rate["per_head"]["mean"][0]) == heads
    last = [row["sos_is_largest_head_mean"][-1] for row in report["rows"]]
    assert rate["head_mean"][-1]["mean"] == pytest.approx(sum(last) / len(last))
    assert rate["head_mean"][-1]["low"] <= rate["head_mean"][-1]["mean"] <= rate["head_mean"][-1]["high"]
    assert "last layer, head-averaged [EOS] row: largest weight on [SOS]" in capsys.readouterr().out
