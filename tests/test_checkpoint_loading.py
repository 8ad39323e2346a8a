"""Released-format checkpoints (GLaMM and LISA layouts, sharded .bin and .safetensors) through from_pretrained.

Each fixture writes a reference model's weights under the released names; loading the files must
give a model whose outputs equal the reference's, with the architecture read from the files.
"""

import json
import logging
import shutil
import sys
from dataclasses import replace
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from fixtures_checkpoints import (
    REGION_ENCODER_KEYS,
    copy_without_weights,
    same_architecture,
    write_released_checkpoint,
    write_weights,
)

from litelvlm.cli import main as cli_main
from litelvlm.models import from_pretrained, load_assets, load_lvlm
from litelvlm.models.checkpoint import CheckpointError
from litelvlm.pruners import LiteLVLM, NoPruning


@pytest.fixture(scope="module")
def glamm(tmp_path_factory):
    return write_released_checkpoint(tmp_path_factory.mktemp("glamm"), "glamm", fmt="bin", shards=3)


@pytest.fixture(scope="module")
def lisa(tmp_path_factory):
    return write_released_checkpoint(tmp_path_factory.mktemp("lisa"), "lisa", fmt="safetensors", shards=2)


@pytest.fixture(scope="module")
def loaded(glamm, lisa):
    """Both fixtures loaded once in float32 (exact comparison with the float32 reference)."""
    return {kind: from_pretrained(fx.folder, dtype="float32") for kind, fx in (("glamm", glamm), ("lisa", lisa))}


def batch_for(fixture, batch, loaded_tokenizer, demo_tokenizer):
    """The demo batch re-expressed for a fixture: its added-token ids, its CLIP and SAM input sizes."""
    input_ids = batch.input_ids.clone()
    demo_vocab, vocab = demo_tokenizer.get_vocab(), loaded_tokenizer.get_vocab()
    for token, demo_id in demo_vocab.items():
        if demo_id >= 1000 and token in vocab:  # the added tokens (the base vocabulary is shared)
            input_ids[batch.input_ids == demo_id] = vocab[token]
    size = fixture.config.vision.image_size
    clip = batch.clip_pixel_values
    if clip.shape[-1] != size:
        clip = F.interpolate(clip, size=(size, size), mode="bilinear", align_corners=False)
    sam_size = fixture.config.sam.image_size
    scale = sam_size / batch.sam_pixel_values.shape[-1]
    sam = F.interpolate(batch.sam_pixel_values, size=(sam_size, sam_size), mode="bilinear", align_corners=False)
    resized = (batch.sam_resized_sizes.float() * scale).round().long()
    return replace(batch, input_ids=input_ids, clip_pixel_values=clip, sam_pixel_values=sam, sam_resized_sizes=resized)


@pytest.fixture(scope="module")
def demo_tokenizer():
    return load_assets("tiny-glamm").llm_tokenizer


@pytest.mark.parametrize("kind", ["glamm", "lisa"])
@pytest.mark.parametrize("pruner", [NoPruning(), LiteLVLM(num_tokens=64)], ids=["no-pruning", "litelvlm"])
def test_outputs_equal_the_reference(kind, pruner, request, loaded, demo_batch, demo_tokenizer):
    fixture = request.getfixturevalue(kind)
    model, tokenizer, _ = loaded[kind]
    batch = batch_for(fixture, demo_batch, tokenizer, demo_tokenizer)
    with torch.no_grad():
        got = model(batch, pruner)
        want = fixture.reference(batch, pruner)
    assert sum(m.shape[0] for m in got.mask_logits) == 6
    for got_logits, want_logits in zip(got.mask_logits, want.mask_logits):
        assert want_logits.std() > 0
        torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-4)
    if got.kept_indices is not None:
        assert torch.equal(got.kept_indices, want.kept_indices)
    torch.testing.assert_close(got.seg_hidden_states, want.seg_hidden_states, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["glamm", "lisa"])
def test_every_weight_equals_the_reference(kind, request, loaded):
    fixture = request.getfixturevalue(kind)
    model = loaded[kind].model
    want, got = fixture.reference.state_dict(), model.state_dict()
    assert set(got) == set(want)
    differ = [key for key in want if not torch.equal(got[key], want[key])]
    assert differ == []
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    sam = model.sam
    assert sam.prompt_encoder.shared_embedding.positional_embedding is sam.shared_image_embedding.positional_embedding


@pytest.mark.parametrize("kind", ["glamm", "lisa"])
def test_architecture_and_tokens_come_from_the_files(kind, request, loaded):
    fixture = request.getfixturevalue(kind)
    model, tokenizer, clip_tokenizer = loaded[kind]
    assert same_architecture(model.config, fixture.config)
    assert model.config.projector == ("mlp2x_gelu" if kind == "glamm" else "linear")
    assert isinstance(model.mm_projector, torch.nn.Linear) == (kind == "lisa")
    assert model.config.protocol == kind
    assert model.config.vision.image_size == (336 if kind == "glamm" else 224)
    added = json.loads((fixture.folder / "added_tokens.json").read_text())
    assert model.seg_token_id == tokenizer.convert_tokens_to_ids("[SEG]") == added["[SEG]"]
    assert model.clip_tokenizer is clip_tokenizer is not None


def test_seg_ids_differ_between_glamm_and_lisa(loaded):
    assert loaded["glamm"].model.seg_token_id == 1004  # after <im_start> <im_end> <bbox> <point>
    assert loaded["lisa"].model.seg_token_id == 1003  # after <im_patch> <im_start> <im_end>


def test_bf16_by_default_and_the_same_values(glamm):
    model, _, _ = from_pretrained(glamm.folder)
    reference = glamm.reference.state_dict()
    for name, param in model.named_parameters():
        assert param.dtype == torch.bfloat16, name
        assert torch.equal(param, reference[name].bfloat16()), name
    assert model.llm.model.rotary_emb.inv_freq.dtype == torch.float32  # computed, not read from the file


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_single_file_checkpoints(fmt, lisa, tmp_path):
    folder = copy_without_weights(lisa.folder, tmp_path / "single")
    write_weights(folder, lisa.released, fmt, shards=1)
    assert not list(folder.glob("*.index.json"))
    model, _, _ = from_pretrained(folder, dtype="float32", with_text_tower=False)
    assert model.text_tower is None
    assert torch.equal(model.sam.vision_encoder.pos_embed, lisa.reference.sam.vision_encoder.pos_embed)
    assert torch.equal(model.mm_projector.weight, lisa.reference.mm_projector.weight)


def test_region_encoder_listed_once_and_inv_freq_dropped(glamm, caplog):
    with caplog.at_level(logging.INFO, logger="litelvlm.models.checkpoint"):
        from_pretrained(glamm.folder, with_text_tower=False)
    listing = [record.getMessage() for record in caplog.records if "region_encoder" in record.getMessage()]
    assert len(listing) == 1
    assert all(key in listing[0] for key in REGION_ENCODER_KEYS)
    assert not any("inv_freq" in record.getMessage() for record in caplog.records)
    assert sum("rotary_emb.inv_freq" in key for key in glamm.released) == glamm.config.llm.num_layers


def variant(fixture, tmp_path, change):
    """A copy of a fixture checkpoint whose tensors went through `change` (same format, 2 shards)."""
    tensors = dict(fixture.released)
    change(tensors)
    folder = copy_without_weights(fixture.folder, tmp_path / "variant")
    write_weights(folder, tensors, "bin", shards=2)
    return folder


def rename(old, new):
    return lambda tensors: tensors.__setitem__(new, tensors.pop(old))


def test_a_renamed_llm_key_is_named(glamm, tmp_path):
    folder = variant(glamm, tmp_path, rename("model.layers.1.mlp.down_proj.weight", "model.layers.1.mlp.down.weight"))
    with pytest.raises(CheckpointError) as error:
        from_pretrained(folder)
    message = str(error.value)
    assert "unexpected keys: model.layers.1.mlp.down.weight" in message
    assert "missing keys: model.layers.1.mlp.down_proj.weight" in message


def test_a_renamed_sam_key_is_named(lisa, tmp_path):
    old = "model.visual_model.mask_decoder.transformer.layers.0.norm3.weight"
    folder = variant(lisa, tmp_path, rename(old, old.replace("norm3", "norm5")))
    with pytest.raises(CheckpointError) as error:
        from_pretrained(folder)
    assert f"missing keys: {old}" in str(error.value)
    assert old.replace("norm3", "norm5") in str(error.value)


@pytest.mark.parametrize(
    "key",
    ["model.text_hidden_fcs.0.2.bias", "model.grounding_encoder.image_encoder.neck.1.bias", "lm_head.weight"],
)
def test_a_missing_key_is_named(glamm, tmp_path, key):
    folder = variant(glamm, tmp_path, lambda tensors: tensors.pop(key))
    with pytest.raises(CheckpointError, match=f"missing keys: {key.replace('.', '[.]')}"):
        from_pretrained(folder)


def test_an_extra_key_is_an_error_not_a_drop(glamm, tmp_path):
    extra = "model.layers.0.self_attn.rotary_emb.cos_cached"
    folder = variant(glamm, tmp_path, lambda tensors: tensors.__setitem__(extra, torch.zeros(4)))
    with pytest.raises(CheckpointError, match=f"unexpected keys: {extra}"):
        from_pretrained(folder)


def test_a_wrong_vocab_size_is_a_shape_error(lisa, tmp_path):
    folder = tmp_path / "wrong_vocab"
    shutil.copytree(lisa.folder, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "vocab_size": config["vocab_size"] + 8}))
    with pytest.raises(CheckpointError, match=r"shape mismatches: .*model\.embed_tokens\.weight"):
        from_pretrained(folder)


def test_clip_checkpoint_named_in_config_or_given(lisa, tmp_path):
    folder = tmp_path / "moved_clip"
    shutil.copytree(lisa.folder, folder)
    config = json.loads((folder / "config.json").read_text())
    config["mm_vision_tower"] = config["vision_tower"] = "/nowhere/clip-vit-large-patch14"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="clip_checkpoint"):
        from_pretrained(folder)
    model, _, _ = from_pretrained(folder, clip_checkpoint=lisa.clip_folder, dtype="float32")
    projection = lisa.reference.vision_tower.visual_projection.weight
    assert torch.equal(model.vision_tower.visual_projection.weight, projection)


def place_in_hub_cache(cache, repo_id, folder, commit):
    """The huggingface_hub cache layout: models--owner--name/{refs/main, snapshots/<commit>/...}."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


def test_hub_ids_resolve_from_the_cache_offline(lisa, tmp_path):
    cache = tmp_path / "hub"
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(lisa.folder, checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    config["mm_vision_tower"] = config["vision_tower"] = "fixture-org/tiny-clip"
    (checkpoint / "config.json").write_text(json.dumps(config))
    place_in_hub_cache(cache, "fixture-org/tiny-lisa", checkpoint, "a" * 40)
    place_in_hub_cache(cache, "fixture-org/tiny-clip", lisa.clip_folder, "b" * 40)
    model, _, _ = from_pretrained("fixture-org/tiny-lisa", dtype="float32", cache_dir=cache, local_files_only=True)
    assert model.config.name == "fixture-org/tiny-lisa" and model.config.clip_checkpoint == "fixture-org/tiny-clip"
    assert torch.equal(model.llm.lm_head.weight, lisa.reference.llm.lm_head.weight)


def test_an_absent_hub_id_says_how_to_place_the_files(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        from_pretrained("fixture-org/absent-model", cache_dir=tmp_path, local_files_only=True)
    assert "'fixture-org/absent-model'" in str(error.value)
    assert "hf download fixture-org/absent-model" in str(error.value)


def test_load_assets_and_load_lvlm_dispatch_to_the_loader(lisa):
    assets = load_assets(str(lisa.folder))
    assert same_architecture(assets.config, lisa.config) and not assets.random_weights
    assert assets.llm_tokenizer.convert_tokens_to_ids("[SEG]") == 1003
    model = load_lvlm(str(lisa.folder), dtype="float32")
    assert model.random_weights is False
    assert torch.equal(model.text_hidden_fcs[2].weight, lisa.reference.text_hidden_fcs[2].weight)


@pytest.mark.parametrize("name", ["no-such-model", "./missing/folder/deeper/still"])
def test_unknown_names_are_file_not_found(name):
    for call in (load_assets, load_lvlm):
        with pytest.raises(FileNotFoundError, match=name.replace(".", "[.]")):
            call(name)


def test_vision_tower_keys_in_the_checkpoint_override_the_clip_checkpoint(lisa, tmp_path):
    key = "model.vision_tower.vision_tower.vision_model.post_layernorm.weight"  # LLaVA's CLIPVisionTower nesting
    own = torch.full((lisa.config.vision.hidden_size,), 0.5)
    folder = variant(lisa, tmp_path, lambda tensors: tensors.__setitem__(key, own))
    model, _, _ = from_pretrained(folder, dtype="float32")
    assert torch.equal(model.vision_tower.vision_model.post_layernorm.weight, own)
    from_clip = lisa.reference.vision_tower.vision_model.pre_layrnorm.weight
    assert torch.equal(model.vision_tower.vision_model.pre_layrnorm.weight, from_clip)


# ----------------------------------------------------------------------------------- damaged shards
def truncated_copy(fixture, tmp_path, name: str) -> tuple[Path, int]:
    """The fixture's checkpoint folder with the shard `name` cut to half its size; returns (folder, full size)."""
    folder = tmp_path / "checkpoint"
    shutil.copytree(fixture.folder, folder)
    shard = folder / name
    size = shard.stat().st_size
    with shard.open("r+b") as handle:
        handle.truncate(size // 2)
    return folder, size


def test_a_truncated_safetensors_shard_is_named_with_its_sizes(lisa, tmp_path):
    name = "model-00002-of-00002.safetensors"
    folder, size = truncated_copy(lisa, tmp_path, name)
    with pytest.raises(CheckpointError) as error:
        from_pretrained(folder, dtype="float32")
    assert str(error.value) == (
        f"weight file {folder / name} is truncated: {size // 2} bytes, its header describes {size}; fetch it again"
    )


def test_a_truncated_bin_shard_is_named(glamm, tmp_path):
    name = "pytorch_model-00002-of-00003.bin"
    folder, _ = truncated_copy(glamm, tmp_path, name)
    size = (folder / name).stat().st_size
    with pytest.raises(CheckpointError) as error:
        from_pretrained(folder, dtype="float32")
    assert str(error.value) == (
        f"weight file {folder / name} is truncated or damaged: a {size}-byte zip archive without its end "
        "(the central directory); fetch it again"
    )


def test_the_cli_names_a_truncated_shard_in_one_line_and_exits_2(lisa, tmp_path, capsys):
    name = "model-00002-of-00002.safetensors"
    folder, size = truncated_copy(lisa, tmp_path, name)
    args = ["validate", "--config", str(Path(__file__).parents[1] / "configs" / "demo.yaml"), "--model.checkpoint", str(folder),
            "--trainer.logger.init_args.save_dir", str(tmp_path / "logs")]  # fmt: skip
    with mock.patch.object(sys, "argv", ["litelvlm.cli"]), pytest.raises(SystemExit) as exit_info:
        cli_main(args)
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in stderr, stderr
    named = [line for line in stderr.splitlines() if str(folder / name) in line]
    assert named == [f"litelvlm: error: weight file {folder / name} is truncated: {size // 2} bytes, "
                     f"its header describes {size}; fetch it again"], stderr  # fmt: skip
