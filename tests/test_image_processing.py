"""CLIP and SAM pre-processing: sizes against hand-worked numbers, values against the references."""

import numpy as np
import pytest
import torch
from PIL import Image

from litelvlm.models.image_processing import (
    CLIP_MEAN,
    CLIP_STD,
    SAM_PIXEL_MEAN,
    SAM_PIXEL_STD,
    clip_crop_geometry,
    clip_preprocess,
    mask_to_clip_patch_coverage,
    sam_preprocess,
    sam_resized_size,
)


def _solid(width, height, colour):
    return Image.new("RGB", (width, height), colour)


@pytest.mark.parametrize(
    "orig_hw, resized_hw",
    [
        ((360, 480), (768, 1024)),  # 480 wide x 360 high: scale 1024/480
        ((480, 360), (1024, 768)),
        ((427, 640), (683, 1024)),  # 683.2 -> 683
        ((300, 700), (439, 1024)),  # 438.86 + 0.5 -> 439 (truncation alone would give 438)
        ((1024, 1024), (1024, 1024)),
    ],
)
def test_sam_resize_keeps_aspect_and_rounds_like_resize_longest_side(orig_hw, resized_hw):
    assert sam_resized_size(*orig_hw, size=1024) == resized_hw


def test_sam_input_is_normalised_image_then_zero_padding():
    pixels, resized = sam_preprocess(_solid(480, 360, (200, 100, 50)))
    assert resized == (768, 1024) and pixels.shape == (3, 1024, 1024) and pixels.dtype == torch.float32
    expected = (torch.tensor([200.0, 100.0, 50.0]) - torch.tensor(SAM_PIXEL_MEAN)) / torch.tensor(SAM_PIXEL_STD)
    torch.testing.assert_close(pixels[:, :768, :], expected[:, None, None].expand(3, 768, 1024))
    assert torch.count_nonzero(pixels[:, 768:, :]) == 0
    tall, tall_size = sam_preprocess(_solid(300, 700, (10, 20, 30)), size=512)
    assert tall_size == (512, 219)  # 300 * 512/700 = 219.43
    assert torch.count_nonzero(tall[:, :, 219:]) == 0 and torch.count_nonzero(tall[:, :, :219]) == 3 * 512 * 219


@pytest.mark.parametrize(
    "orig_hw, size, geometry",
    [
        ((360, 480), 336, (336, 448, 0, 56)),
        ((401, 299), 336, (450, 336, 57, 0)),  # 336 * 401/299 = 450.65, truncated as transformers does
        ((1000, 337), 336, (997, 336, 330, 0)),  # crop top (997 - 336) // 2 = 330
        ((480, 640), 224, (224, 298, 0, 37)),  # LISA's 224-px tower: 298.67 -> 298
        ((336, 336), 336, (336, 336, 0, 0)),
    ],
)
def test_clip_crop_geometry_against_hand_numbers(orig_hw, size, geometry):
    assert clip_crop_geometry(*orig_hw, size) == geometry


def test_clip_normalises_a_solid_image_with_clip_mean_and_std():
    pixels = clip_preprocess(_solid(480, 360, (255, 128, 0)), size=336)
    expected = (torch.tensor([255.0, 128.0, 0.0]) / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert pixels.shape == (3, 336, 336) and pixels.dtype == torch.float32
    torch.testing.assert_close(pixels, expected[:, None, None].expand(3, 336, 336))


def test_clip_matches_transformers_clip_image_processor():
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    # Without torchvision, transformers falls back to its PIL backend, which does what we do step
    # for step; its torchvision backend's bicubic differs by a rounding step here and there.
    same_backend = "Pil" in type(processor).__name__
    rng = np.random.default_rng(0)
    smooth = np.stack(np.meshgrid(np.linspace(0, 255, 333), np.linspace(0, 255, 251)), -1)
    images = [
        Image.fromarray(rng.integers(0, 256, (401, 299, 3), dtype=np.uint8)),
        Image.fromarray(np.concatenate([smooth, smooth[..., :1]], -1).astype(np.uint8)),
    ]
    for image in images:
        reference = torch.as_tensor(np.asarray(processor(images=image, return_tensors="pt")["pixel_values"][0]))
        ours = clip_preprocess(image, size=336)
        assert ours.shape == reference.shape == (3, 336, 336)
        if same_backend:
            torch.testing.assert_close(ours, reference, atol=1e-6, rtol=0)
        else:
            assert (ours - reference).abs().mean() < 0.01 and (ours - reference).abs().max() < 0.1


def test_patch_coverage_follows_the_crop_and_averages_per_cell():
    # 28 x 56 image, size 28, patch 14: no scaling, crop columns 14..41, a 2 x 2 patch grid.
    mask = np.zeros((28, 56), dtype=bool)
    mask[:, 14:28] = True  # the left half of the crop
    expected = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    torch.testing.assert_close(mask_to_clip_patch_coverage(mask, size=28, patch=14), expected)
    # Twice as large: the box filter halves it first, same coverage.
    big = np.zeros((56, 112), dtype=bool)
    big[:, 28:56] = True
    torch.testing.assert_close(mask_to_clip_patch_coverage(torch.from_numpy(big), size=28, patch=14), expected)
    # Seven of the fourteen rows of the top-left cell: coverage one half.
    partial = np.zeros((28, 56), dtype=bool)
    partial[0:7, 14:28] = True
    torch.testing.assert_close(
        mask_to_clip_patch_coverage(partial, size=28, patch=14), torch.tensor([[0.5, 0.0], [0.0, 0.0]])
    )
    assert mask_to_clip_patch_coverage(np.ones((360, 480), dtype=bool), size=336, patch=14).shape == (24, 24)
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        mask_to_clip_patch_coverage(mask, size=30, patch=14)
