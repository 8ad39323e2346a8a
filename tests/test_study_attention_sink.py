"""The text attention sink study: shares against a direct reading of the attentions, and the config end to end."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from litelvlm.analysis.attention_sink import eager_copy, measure_questions

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
        head_mean = attentions[-1][0, :, eos].double().mean(0).tolist()
        assert measured["last_layer_eos_row"][q] == pytest.approx(head_mean, abs=1e-6)
    total = measured["shares"]["sos"] + measured["shares"]["content"] + measured["shares"]["self"]
    torch.testing.assert_close(total, torch.ones_like(total), atol=1e-6, rtol=0)


def test_attention_sink_config_runs_end_to_end(tmp_path, tiny_model):
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
