"""Original segment-anything state dicts into transformers' SamModel: every tensor placed, architecture from shapes.

The original-layout state dicts are built here by hand from the original naming and shapes
(segment-anything's image_encoder.py, prompt_encoder.py, mask_decoder.py, transformer.py).
"""

import importlib.util
import os
import sys

import pytest
import torch
from fixtures_checkpoints import original_sam_state_dict
from safetensors.torch import save_file

from litelvlm.models import load_sam_from_original, sam_original_to_hf
from litelvlm.models.sam_conversion import (
    SamConversionError,
    infer_sam_config,
    sam_hf_key_to_original,
    sam_original_key_to_hf,
)

TINY = dict(
    dim=32, depth=3, heads=2, global_indexes=(1,), image=128, patch=16, window=3, mlp=64, prompt=32,
    decoder_mlp=48, decoder_layers=2, downsample=2, mask_channels=16, multimask=3, iou_depth=3, iou_hidden=24,
)
VIT = {  # segment-anything's build_sam.py: vit_b / vit_l / vit_h
    "vit_b": dict(dim=768, depth=12, heads=12, global_indexes=(2, 5, 8, 11)),
    "vit_l": dict(dim=1024, depth=24, heads=16, global_indexes=(5, 11, 17, 23)),
    "vit_h": dict(dim=1280, depth=32, heads=16, global_indexes=(7, 15, 23, 31)),
}
VIT_COMMON = dict(
    image=1024, patch=16, window=14, prompt=256, decoder_mlp=2048, decoder_layers=2, downsample=2,
    mask_channels=16, multimask=3, iou_depth=3, iou_hidden=256,
)


def original_sam_shapes(
    dim, depth, heads, global_indexes, image, patch, window, mlp, prompt, decoder_mlp, decoder_layers,
    downsample, mask_channels, multimask, iou_depth, iou_hidden,
) -> dict[str, tuple[int, ...]]:
    """Every key of an original SAM checkpoint with its shape."""
    grid, head_dim, inner, tokens = image // patch, dim // heads, prompt // downsample, multimask + 1
    shapes = {
        "image_encoder.patch_embed.proj.weight": (dim, 3, patch, patch),
        "image_encoder.patch_embed.proj.bias": (dim,),
        "image_encoder.pos_embed": (1, grid, grid, dim),
    }
    for i in range(depth):
        size = grid if i in global_indexes else window
        b = f"image_encoder.blocks.{i}."
        shapes.update({
            b + "norm1.weight": (dim,), b + "norm1.bias": (dim,),
            b + "attn.qkv.weight": (3 * dim, dim), b + "attn.qkv.bias": (3 * dim,),
            b + "attn.proj.weight": (dim, dim), b + "attn.proj.bias": (dim,),
            b + "attn.rel_pos_h": (2 * size - 1, head_dim), b + "attn.rel_pos_w": (2 * size - 1, head_dim),
            b + "norm2.weight": (dim,), b + "norm2.bias": (dim,),
            b + "mlp.lin1.weight": (mlp, dim), b + "mlp.lin1.bias": (mlp,),
            b + "mlp.lin2.weight": (dim, mlp), b + "mlp.lin2.bias": (dim,),
        })
    shapes.update({
        "image_encoder.neck.0.weight": (prompt, dim, 1, 1),
        "image_encoder.neck.1.weight": (prompt,), "image_encoder.neck.1.bias": (prompt,),
        "image_encoder.neck.2.weight": (prompt, prompt, 3, 3),
        "image_encoder.neck.3.weight": (prompt,), "image_encoder.neck.3.bias": (prompt,),
        "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix": (2, prompt // 2),
        "prompt_encoder.not_a_point_embed.weight": (1, prompt),
        "prompt_encoder.no_mask_embed.weight": (1, prompt),
        "prompt_encoder.mask_downscaling.0.weight": (mask_channels // 4, 1, 2, 2),
        "prompt_encoder.mask_downscaling.0.bias": (mask_channels // 4,),
        "prompt_encoder.mask_downscaling.1.weight": (mask_channels // 4,),
        "prompt_encoder.mask_downscaling.1.bias": (mask_channels // 4,),
        "prompt_encoder.mask_downscaling.3.weight": (mask_channels, mask_channels // 4, 2, 2),
        "prompt_encoder.mask_downscaling.3.bias": (mask_channels,),
        "prompt_encoder.mask_downscaling.4.weight": (mask_channels,),
        "prompt_encoder.mask_downscaling.4.bias": (mask_channels,),
        "prompt_encoder.mask_downscaling.6.weight": (prompt, mask_channels, 1, 1),
        "prompt_encoder.mask_downscaling.6.bias": (prompt,),
        "mask_decoder.iou_token.weight": (1, prompt),
        "mask_decoder.mask_tokens.weight": (tokens, prompt),
        "mask_decoder.output_upscaling.0.weight": (prompt, prompt // 4, 2, 2),
        "mask_decoder.output_upscaling.0.bias": (prompt // 4,),
        "mask_decoder.output_upscaling.1.weight": (prompt // 4,),
        "mask_decoder.output_upscaling.1.bias": (prompt // 4,),
        "mask_decoder.output_upscaling.3.weight": (prompt // 4, prompt // 8, 2, 2),
        "mask_decoder.output_upscaling.3.bias": (prompt // 8,),
        "mask_decoder.transformer.norm_final_attn.weight": (prompt,),
        "mask_decoder.transformer.norm_final_attn.bias": (prompt,),
    })
    shapes.update({f"prompt_encoder.point_embeddings.{j}.weight": (1, prompt) for j in range(4)})

    def attention(prefix, width):
        for name in ("q_proj", "k_proj", "v_proj"):
            shapes[f"{prefix}.{name}.weight"], shapes[f"{prefix}.{name}.bias"] = (width, prompt), (width,)
        shapes[f"{prefix}.out_proj.weight"], shapes[f"{prefix}.out_proj.bias"] = (prompt, width), (prompt,)

    for i in range(decoder_layers):
        layer = f"mask_decoder.transformer.layers.{i}"
        attention(f"{layer}.self_attn", prompt)
        attention(f"{layer}.cross_attn_token_to_image", inner)
        attention(f"{layer}.cross_attn_image_to_token", inner)
        for n in range(1, 5):
            shapes[f"{layer}.norm{n}.weight"] = shapes[f"{layer}.norm{n}.bias"] = (prompt,)
        shapes.update({
            f"{layer}.mlp.lin1.weight": (decoder_mlp, prompt), f"{layer}.mlp.lin1.bias": (decoder_mlp,),
            f"{layer}.mlp.lin2.weight": (prompt, decoder_mlp), f"{layer}.mlp.lin2.bias": (prompt,),
        })
    attention("mask_decoder.transformer.final_attn_token_to_image", inner)

    def mlp_head(prefix, dims):
        for k, (fan_in, fan_out) in enumerate(zip(dims, dims[1:])):
            shapes[f"{prefix}.layers.{k}.weight"], shapes[f"{prefix}.layers.{k}.bias"] = (fan_out, fan_in), (fan_out,)

    for j in range(tokens):
        mlp_head(f"mask_decoder.output_hypernetworks_mlps.{j}", [prompt, prompt, prompt, prompt // 8])
    mlp_head("mask_decoder.iou_prediction_head", [prompt] + [iou_hidden] * (iou_depth - 1) + [tokens])
    return shapes


def random_state_dict(shapes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {key: torch.randn(shape, generator=generator) for key, shape in shapes.items()}


@pytest.fixture(scope="module")
def original():
    return random_state_dict(original_sam_shapes(**TINY))


@pytest.fixture(scope="module")
def converted_model(original):
    return load_sam_from_original(original)


def test_every_parameter_holds_its_original_tensor(original, converted_model):
    """Renamed back with the fixtures' own table, the model's state dict is the source, tensor for tensor."""
    model_state = converted_model.state_dict()
    back = original_sam_state_dict(model_state)
    assert set(back) == set(original)
    for key, value in original.items():
        assert torch.equal(back[key], value), key
    shared = converted_model.shared_image_embedding.positional_embedding
    assert converted_model.prompt_encoder.shared_embedding.positional_embedding is shared
    assert torch.equal(shared, original["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"])


def test_placement_is_a_bijection_by_value(original, converted_model):
    """Independent of any naming: each distinct parameter equals exactly one source tensor, all used once."""
    def fingerprint(tensor):
        return tuple(tensor.shape), tuple(tensor.detach().flatten()[:8].tolist())

    by_value = {}
    for key, value in original.items():
        by_value.setdefault(fingerprint(value), []).append(key)
    assert all(len(keys) == 1 for keys in by_value.values())  # random tensors are distinct
    used = []
    for name, param in converted_model.named_parameters():  # tied parameter listed once
        match = by_value.get(fingerprint(param))
        assert match is not None, f"{name} holds no source tensor (left at init?)"
        assert torch.equal(param, original[match[0]]), name
        used.append(match[0])
    assert sorted(used) == sorted(original)
    assert not list(converted_model.buffers())


def test_mapping_returns_the_same_tensors_and_is_invertible(original):
    converted = sam_original_to_hf({**original, "pixel_mean": torch.zeros(3, 1, 1), "pixel_std": torch.ones(3, 1, 1)})
    assert len(converted) == len(original) + 1  # the tied copy of the Gaussian matrix
    for key, value in original.items():
        targets = sam_original_key_to_hf(key)
        assert all(converted[target] is value for target in targets)
        assert {sam_hf_key_to_original(target) for target in targets} == {key}
    assert converted["shared_image_embedding.positional_embedding"] is converted[
        "prompt_encoder.shared_embedding.positional_embedding"
    ]


def test_documented_correspondences():
    """A few names spelled out in docs/models.md, one per renaming rule family."""
    expect = {
        "image_encoder.patch_embed.proj.weight": "vision_encoder.patch_embed.projection.weight",
        "image_encoder.blocks.3.norm2.bias": "vision_encoder.layers.3.layer_norm2.bias",
        "image_encoder.blocks.0.attn.rel_pos_w": "vision_encoder.layers.0.attn.rel_pos_w",
        "image_encoder.neck.3.weight": "vision_encoder.neck.layer_norm2.weight",
        "prompt_encoder.mask_downscaling.6.bias": "prompt_encoder.mask_embed.conv3.bias",
        "prompt_encoder.point_embeddings.2.weight": "prompt_encoder.point_embed.2.weight",
        "mask_decoder.transformer.layers.1.norm4.weight": "mask_decoder.transformer.layers.1.layer_norm4.weight",
        "mask_decoder.transformer.norm_final_attn.bias": "mask_decoder.transformer.layer_norm_final_attn.bias",
        "mask_decoder.output_upscaling.1.weight": "mask_decoder.upscale_layer_norm.weight",
        "mask_decoder.output_hypernetworks_mlps.3.layers.1.weight": (
            "mask_decoder.output_hypernetworks_mlps.3.layers.0.weight"
        ),
        "mask_decoder.iou_prediction_head.layers.2.bias": "mask_decoder.iou_prediction_head.proj_out.bias",
    }
    for original_key, hf_key in expect.items():
        assert sam_original_key_to_hf(original_key) == (hf_key,)


def test_architecture_read_from_shapes(converted_model):
    vision = converted_model.config.vision_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads) == (32, 3, 2)
    assert (vision.image_size, vision.patch_size, vision.window_size, vision.mlp_dim) == (128, 16, 3, 64)
    assert list(vision.global_attn_indexes) == [1]
    decoder = converted_model.config.mask_decoder_config
    assert (decoder.hidden_size, decoder.mlp_dim) == (32, 48)
    assert (decoder.iou_head_hidden_dim, decoder.iou_head_depth) == (24, 3)
    assert converted_model.config.prompt_encoder_config.mask_input_channels == 16


@pytest.mark.parametrize("variant", sorted(VIT))
def test_vit_variants_inferred_on_meta_tensors(variant):
    dims = {**VIT[variant], **VIT_COMMON, "mlp": 4 * VIT[variant]["dim"]}
    shapes = original_sam_shapes(**dims)
    if variant == "vit_h":
        assert len(shapes) == 594  # the count the released GLaMM / LISA files hold
    meta = {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}
    config = infer_sam_config(meta)
    vision, decoder = config.vision_config, config.mask_decoder_config
    assert vision.hidden_size == dims["dim"] and vision.num_hidden_layers == dims["depth"]
    assert vision.num_attention_heads == dims["heads"]
    assert list(vision.global_attn_indexes) == list(dims["global_indexes"])
    assert (vision.image_size, vision.patch_size, vision.window_size, vision.mlp_dim) == (1024, 16, 14, 4 * dims["dim"])
    assert (vision.output_channels, decoder.mlp_dim) == (256, 2048)
    assert (decoder.num_attention_heads, decoder.iou_head_hidden_dim) == (8, 256)
    model = load_sam_from_original(meta)  # the whole placement, without memory
    if variant == "vit_h":
        assert len(model.state_dict()) == 595  # 594 + transformers' tied copy of the Gaussian matrix
    assert all(param.is_meta for param in model.parameters())


def test_prefix_paths_and_buffers(tmp_path, original):
    prefixed = {f"model.visual_model.{key}": value for key, value in original.items()}
    prefixed["model.visual_model.pixel_mean"] = torch.tensor([123.675, 116.28, 103.53]).view(-1, 1, 1)
    prefixed["model.text_hidden_fcs.0.0.weight"] = torch.zeros(2, 2)  # not under the prefix: ignored
    torch.save(prefixed, tmp_path / "lisa_part.pth")
    save_file(dict(original), str(tmp_path / "sam.safetensors"))
    from_pth = load_sam_from_original(tmp_path / "lisa_part.pth", prefix="model.visual_model.")
    from_safetensors = load_sam_from_original(str(tmp_path / "sam.safetensors"), dtype=torch.bfloat16)
    key = "mask_decoder.transformer.layers.1.layer_norm3.weight"
    assert torch.equal(from_pth.state_dict()[key], original["mask_decoder.transformer.layers.1.norm3.weight"])
    assert from_safetensors.state_dict()[key].dtype == torch.bfloat16


def test_deeper_iou_head_maps_its_middle_layers():
    original = random_state_dict(original_sam_shapes(**{**TINY, "iou_depth": 4}), seed=1)
    model = load_sam_from_original(original)
    head = model.mask_decoder.iou_prediction_head
    assert torch.equal(head.proj_in.weight, original["mask_decoder.iou_prediction_head.layers.0.weight"])
    assert torch.equal(head.layers[1].weight, original["mask_decoder.iou_prediction_head.layers.2.weight"])
    assert torch.equal(head.proj_out.weight, original["mask_decoder.iou_prediction_head.layers.3.weight"])


def test_unknown_and_missing_keys_are_named(original):
    renamed = dict(original)
    norm3 = "mask_decoder.transformer.layers.0.norm3.weight"
    renamed[norm3.replace("norm3", "norm5")] = renamed.pop(norm3)
    with pytest.raises(SamConversionError, match=r"mask_decoder\.transformer\.layers\.0\.norm5\.weight"):
        load_sam_from_original(renamed)
    missing = {k: v for k, v in original.items() if k != "image_encoder.neck.1.bias"}
    with pytest.raises(SamConversionError, match=r"missing original keys: image_encoder\.neck\.1\.bias"):
        load_sam_from_original(missing)
    no_pos = {k: v for k, v in original.items() if k != "image_encoder.pos_embed"}
    with pytest.raises(SamConversionError, match=r"image_encoder\.pos_embed"):
        load_sam_from_original(no_pos)


def _segment_anything_modeling():
    """segment-anything's `modeling` subpackage on its own (its package __init__ needs torchvision)."""
    spec = importlib.util.find_spec("segment_anything")
    if spec is None:
        pytest.skip("segment-anything is not installed (pip install segment-anything)")
    folder = os.path.join(os.path.dirname(spec.origin), "modeling")
    module_spec = importlib.util.spec_from_file_location(
        "_sam_original_modeling", os.path.join(folder, "__init__.py"), submodule_search_locations=[folder]
    )
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_spec.name] = module
    module_spec.loader.exec_module(module)
    return module


def test_numerics_equal_segment_anything():
    """Against the original implementation: same image embeddings, prompts and masks to float rounding."""
    from functools import partial

    sam_modeling = _segment_anything_modeling()
    torch.manual_seed(0)
    image, patch, prompt = 128, 16, 32
    original = sam_modeling.Sam(
        image_encoder=sam_modeling.ImageEncoderViT(
            depth=3, embed_dim=32, img_size=image, mlp_ratio=2, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=2, patch_size=patch, qkv_bias=True, use_rel_pos=True, global_attn_indexes=[1],
            window_size=3, out_chans=prompt,
        ),
        prompt_encoder=sam_modeling.PromptEncoder(
            embed_dim=prompt, image_embedding_size=(image // patch,) * 2, input_image_size=(image, image),
            mask_in_chans=16,
        ),
        mask_decoder=sam_modeling.MaskDecoder(
            num_multimask_outputs=3,
            transformer=sam_modeling.TwoWayTransformer(depth=2, embedding_dim=prompt, mlp_dim=48, num_heads=8),
            transformer_dim=prompt, iou_head_depth=3, iou_head_hidden_dim=24,
        ),
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375],
    ).eval()
    with torch.no_grad():
        for param in original.parameters():
            param.normal_(0, 0.2)
        original.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.normal_()
        converted = load_sam_from_original(original.state_dict())
        pixels = torch.randn(1, 3, image, image)
        embeddings = original.image_encoder(pixels)
        torch.testing.assert_close(converted.vision_encoder(pixels)[0], embeddings, rtol=1e-5, atol=1e-5)
        dense_pe = original.prompt_encoder.get_dense_pe()
        torch.testing.assert_close(converted.get_image_wide_positional_embeddings(), dense_pe)
        points, labels = torch.rand(1, 3, 2) * image, torch.tensor([[1, 0, 1]])
        sparse, dense = original.prompt_encoder(points=(points, labels), boxes=None, masks=None)
        sparse_hf, dense_hf = converted.prompt_encoder(points[:, None], labels[:, None], None, None)
        torch.testing.assert_close(sparse_hf[:, 0], sparse)
        masks, iou = original.mask_decoder(embeddings, dense_pe, sparse, dense, multimask_output=True)
        masks_hf, iou_hf = converted.mask_decoder(embeddings, dense_pe, sparse_hf, dense_hf, multimask_output=True)
        torch.testing.assert_close(masks_hf[:, 0], masks, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(iou_hf[:, 0], iou, rtol=1e-5, atol=1e-5)
        mask_input = torch.randn(1, 1, 4 * image // patch, 4 * image // patch)
        torch.testing.assert_close(converted.prompt_encoder(None, None, None, mask_input)[1],
                                   original.prompt_encoder(points=None, boxes=None, masks=mask_input)[1])
