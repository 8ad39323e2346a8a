"""Decoding an image file the way the reference readers see it."""

from __future__ import annotations

from PIL import Image, ImageOps


def decode_rgb(file) -> Image.Image:
    """The image (a path or a binary file object) as RGB, turned upright by its EXIF orientation tag.

    GLaMM and LISA read images with OpenCV's `cv2.imread`, which applies the EXIF orientation; a
    photo stored sideways with an orientation tag is therefore seen, and annotated in COCO, upright.
    """
    with Image.open(file) as image:
        return ImageOps.exif_transpose(image).convert("RGB")
