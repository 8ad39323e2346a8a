"""Encoders-only builds: CLIP towers alone, the same CLIP weights as a full build, only the CLIP shards read."""

from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import pytest
import safetensors
import torch
from fixtures_checkpoints import copy_without_weights, write_released_checkpoint, write_weights
from safetensors.torch import save_file

from litelvlm.engine.module import ReferringSegmentationModule
from litelvlm.errors import LitelvlmError
from litelvlm.models import from_pretrained, load_lvlm
from litelvlm.models.checkpoint import CheckpointError
from litelvlm.pruners import NoPruning

GROUNDING_PARTS = ("mm_projector", "llm", "text_hidden_fcs", "sam")
CLIP_PARTS = ("vision_tower.", "text_tower.")
VISION_SHARD = "model-vision.safetensors"


def parameter_count(module: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def assert_same_clip(encoders_only, full) -> None:
    """The encoders-only model holds exactly the full model's CLIP tensors, with equal values."""
    mine, theirs = encoders_only.state_dict(), full.state_dict()
    assert mine and set(mine) == {key for key in theirs if key.startswith(CLIP_PARTS)}
    for key, value in mine.items():
        assert torch.equal(value, theirs[key]), key


def test_tiny_encoders_only_build_holds_clip_alone_with_the_full_builds_weights():
    full = load_lvlm("tiny-glamm", seed=3)
    encoders = load_lvlm("tiny-glamm", seed=3, encoders_only=True)
    assert all(getattr(encoders, part) is None for part in GROUNDING_PARTS)
    clip_parameters = parameter_count(full.vision_tower) + parameter_count(full.text_tower)
    assert parameter_count(encoders) == clip_parameters < parameter_count(full)
    assert_same_clip(encoders, full)
    assert not torch.equal(  # the seed does reach the towers: another seed, other weights
        load_lvlm("tiny-glamm", seed=4, encoders_only=True).vision_tower.visual_projection.weight,
        encoders.vision_tower.visual_projection.weight,
    )


def test_encoders_only_encodes_as_a_full_build_and_refuses_to_ground(demo_batch):
    full, encoders = load_lvlm("tiny-glamm"), load_lvlm("tiny-glamm", encoders_only=True)
    with torch.no_grad():
        ours = encoders.encode(demo_batch, [], extra_text_keys=[("question", "eos", "truncate")], for_grounding=False)
        theirs = full.encode(demo_batch, [], extra_text_keys=[("question", "eos", "truncate")], for_grounding=False)
        patches, _ = encoders.encode_image(demo_batch.clip_pixel_values, frozenset())
        full_patches, _ = full.encode_image(demo_batch.clip_pixel_values, frozenset())
    assert torch.equal(ours.text_embeds[("question", "eos", "truncate")][0], theirs.text_embeds[("question", "eos", "truncate")][0])
    assert torch.equal(patches, full_patches)
    assert encoders.num_patches == full.num_patches == 576
    for call in (
        lambda: encoders(demo_batch, NoPruning()),
        lambda: encoders.encode(demo_batch, [NoPruning()]),
        lambda: encoders.ground(demo_batch, ours, NoPruning()),
        lambda: encoders.encode_sam_image(demo_batch.sam_pixel_values),
    ):
        with pytest.raises(LitelvlmError, match="built encoders-only: .* not available"):
            call()


def test_module_builds_encoders_only_and_refuses_fit_and_finetuned_weights(tmp_path):
    module = ReferringSegmentationModule("tiny-glamm", encoders_only=True)
    assert module.lvlm.llm is None and module.lvlm.sam is None and module.base_identity is None
    with pytest.raises(LitelvlmError, match="model.encoders_only builds only CLIP"):
        module.setup("fit")
    with pytest.raises(LitelvlmError, match="model.finetuned needs the whole model"):
        ReferringSegmentationModule("tiny-glamm", encoders_only=True, finetuned=str(tmp_path))


# ---------------------------------------------------------------- released checkpoints
@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A sharded GLaMM-layout checkpoint (safetensors, 3 shards) plus a 4th shard holding CLIP vision
    tensors under `model.vision_tower.*` (their values shifted, so they show where they came from)."""
    fixture = write_released_checkpoint(tmp_path_factory.mktemp("released"), "glamm", fmt="safetensors", shards=3)
    vision = {
        f"model.vision_tower.vision_tower.{key}": value + 0.5
        for key, value in fixture.reference.vision_tower.state_dict().items()
        if key.startswith("vision_model.encoder.layers.0.")
    }
    save_file({key: value.contiguous() for key, value in vision.items()}, str(fixture.folder / VISION_SHARD))
    index_path = fixture.folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"].update(dict.fromkeys(vision, VISION_SHARD))
    index_path.write_text(json.dumps(index))
    return fixture, vision


def opened_files(folder: Path):
    """Patch safetensors' and torch's file openers; record which files of `folder` they open."""
    opened: list[str] = []
    safe_open, torch_load = safetensors.safe_open, torch.load

    def record(path) -> None:
        if Path(path).parent == Path(folder):
            opened.append(Path(path).name)

    def recording_safe_open(path, *args, **kwargs):
        record(path)
        return safe_open(path, *args, **kwargs)

    def recording_load(path, *args, **kwargs):
        record(path)
        return torch_load(path, *args, **kwargs)

    patches = [mock.patch.object(safetensors, "safe_open", recording_safe_open),
               mock.patch.object(torch, "load", recording_load)]
    return opened, patches


def load_recording(folder: Path, **kwargs):
    opened, patches = opened_files(folder)
    with patches[0], patches[1]:
        model = from_pretrained(folder, dtype="float32", **kwargs).model
    return model, opened


def test_released_encoders_only_reads_only_the_clip_shard_and_equals_the_full_load(released):
    fixture, vision = released
    full, full_opened = load_recording(fixture.folder)
    encoders, opened = load_recording(fixture.folder, encoders_only=True)
    shards = sorted(path.name for path in fixture.folder.glob("model-*-of-*.safetensors"))
    assert len(shards) == 3 and set(full_opened) == {*shards, VISION_SHARD}  # the probe sees every file read
    assert set(opened) == {VISION_SHARD}
    assert all(getattr(encoders, part) is None for part in GROUNDING_PARTS)
    assert parameter_count(encoders) == parameter_count(full.vision_tower) + parameter_count(full.text_tower)
    assert_same_clip(encoders, full)
    key = "vision_model.encoder.layers.0.self_attn.q_proj.weight"
    assert torch.equal(encoders.vision_tower.state_dict()[key], vision[f"model.vision_tower.vision_tower.{key}"])


def test_released_encoders_only_without_clip_tensors_opens_no_shard(released, tmp_path):
    """The released GLaMM/LISA indexes list no CLIP tensor: the towers come from the CLIP checkpoint alone."""
    fixture, _ = released
    folder = copy_without_weights(fixture.folder, tmp_path / "no_vision")
    write_weights(folder, fixture.released, "safetensors", shards=2)
    encoders, opened = load_recording(folder, encoders_only=True)
    assert opened == []
    reference = fixture.reference.vision_tower.visual_projection.weight
    assert torch.equal(encoders.vision_tower.visual_projection.weight, reference)


def test_released_encoders_only_ignores_the_skipped_parts_keys(released, tmp_path):
    """A key missing from the LLM or SAM fails a full load but not an encoders-only one."""
    fixture, _ = released
    folder = copy_without_weights(fixture.folder, tmp_path / "no_lm_head")
    tensors = {key: value for key, value in fixture.released.items() if key != "lm_head.weight"}
    tensors["model.grounding_encoder.mask_decoder.unknown_tensor"] = torch.zeros(2)
    write_weights(folder, tensors, "bin", shards=2)
    with pytest.raises(CheckpointError, match="missing keys: lm_head.weight"):
        from_pretrained(folder)
    encoders, opened = load_recording(folder, encoders_only=True)
    assert opened == [] and encoders.llm is None
