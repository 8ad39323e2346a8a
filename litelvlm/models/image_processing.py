"""The two image branches of GLaMM / LISA: CLIP (global context) and SAM (grounding), as plain functions.

CLIP follows transformers' `CLIPImageProcessor`: shortest side to `size` with PIL bicubic, the long
side `int(size * long / short)` (truncated, as `get_resize_output_image_size` computes it), centre
crop with offsets `(resized - size) // 2`, scale by 1/255, CLIP mean/std. On uint8 RGB input this is
the processor's PIL backend operation for operation.

SAM follows segment-anything's `ResizeLongestSide`: scale = size / longest side, new side =
`int(side * scale + 0.5)`, resized with PIL bilinear (what its torchvision `resize` on a PIL image
does), normalised on 0-255 RGB, zero-padded right and bottom to size x size.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from litelvlm.errors import LitelvlmError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


def clip_crop_geometry(orig_h: int, orig_w: int, size: int) -> tuple[int, int, int, int]:
    """(resized h, resized w, crop top, crop left) of the CLIP branch, for putting masks through it too."""
    short, long = (orig_h, orig_w) if orig_h <= orig_w else (orig_w, orig_h)
    new_long = int(size * long / short)
    resized_h, resized_w = (size, new_long) if orig_h <= orig_w else (new_long, size)
    return resized_h, resized_w, (resized_h - size) // 2, (resized_w - size) // 2


def clip_preprocess(image: Image.Image, size: int = 336) -> torch.Tensor:
    """float32 [3, size, size]: CLIP-normalised centre crop of the shortest-side-resized image."""
    image = image.convert("RGB")
    resized_h, resized_w, top, left = clip_crop_geometry(image.height, image.width, size)
    resized = image.resize((resized_w, resized_h), resample=Image.Resampling.BICUBIC)
    cropped = np.asarray(resized)[top : top + size, left : left + size]
    pixels = torch.from_numpy(cropped.astype(np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(CLIP_STD, dtype=torch.float32)[:, None, None]
    return (pixels - mean) / std


def sam_resized_size(orig_h: int, orig_w: int, size: int = 1024) -> tuple[int, int]:
    """(h, w) after scaling the longest side to `size`, rounded as segment-anything rounds."""
    scale = size * 1.0 / max(orig_h, orig_w)
    return int(orig_h * scale + 0.5), int(orig_w * scale + 0.5)


def sam_preprocess(image: Image.Image, size: int = 1024) -> tuple[torch.Tensor, tuple[int, int]]:
    """(float32 [3, size, size] SAM input, resized (h, w)); the padding is zeros after normalising."""
    image = image.convert("RGB")
    resized_h, resized_w = sam_resized_size(image.height, image.width, size)
    resized = image.resize((resized_w, resized_h), resample=Image.Resampling.BILINEAR)
    pixels = torch.from_numpy(np.asarray(resized).astype(np.float32)).permute(2, 0, 1)
    mean = torch.tensor(SAM_PIXEL_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(SAM_PIXEL_STD, dtype=torch.float32)[:, None, None]
    padded = torch.zeros(3, size, size, dtype=torch.float32)
    padded[:, :resized_h, :resized_w] = (pixels - mean) / std
    return padded, (resized_h, resized_w)


def mask_to_clip_patch_coverage(mask, size: int, patch: int) -> torch.Tensor:
    """float32 [size // patch, size // patch]: the fraction of each CLIP patch the mask covers.

    The mask goes through the CLIP geometry (shortest side to `size`, centre crop); resizing uses
    a box filter so a resized pixel holds the covered fraction of the source pixels it spans.
    """
    mask = mask.cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if mask.ndim != 2:
        raise LitelvlmError(f"mask must be [H, W], got shape {mask.shape}")
    if size % patch != 0:
        raise LitelvlmError(f"size {size} is not a multiple of the patch size {patch}")
    resized_h, resized_w, top, left = clip_crop_geometry(mask.shape[0], mask.shape[1], size)
    as_float = Image.fromarray(mask.astype(np.float32))
    resized = np.asarray(as_float.resize((resized_w, resized_h), resample=Image.Resampling.BOX))
    cropped = resized[top : top + size, left : left + size]
    grid = size // patch
    cells = cropped.reshape(grid, patch, grid, patch).mean(axis=(1, 3))
    return torch.from_numpy(np.ascontiguousarray(cells, dtype=np.float32))
