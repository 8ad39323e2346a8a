"""Shared fixtures: a private cache, the tiny random-weight model and a batch of the demo data."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Tokenizers and demo data are built into a fresh cache, so tests never depend on ~/.cache."""
    folder = tmp_path_factory.mktemp("litelvlm_cache")
    old = os.environ.get("LITELVLM_CACHE")
    os.environ["LITELVLM_CACHE"] = str(folder)
    yield folder
    if old is None:
        os.environ.pop("LITELVLM_CACHE", None)
    else:
        os.environ["LITELVLM_CACHE"] = old


@pytest.fixture(autouse=True)
def shipped_pruner_registry(monkeypatch):
    """A pruner a test registers stays in that test, so the tests that list every registered method
    (the grids, gpu_check's table) see the package's, whatever ran before them."""
    from litelvlm.pruners import registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


@pytest.fixture(scope="session")
def tiny_model(private_cache):
    from litelvlm.models.loading import load_lvlm

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    return load_lvlm("tiny-glamm", seed=0)


@pytest.fixture(scope="session")
def demo_batch(private_cache):
    """Two demo images with 3 sentences each, processed for the tiny model."""
    from litelvlm.data.datamodule import ReferringDataModule

    data = ReferringDataModule(batch_size=2)
    data.setup()
    return next(iter(data.val_dataloader()))


@contextlib.contextmanager
def sam_image_cache(model):
    """Memoise SAM's image encoder for pixel inputs it has already seen, to keep these tests fast.

    The image embeddings depend on the image alone (never on prompts, pruning or the LLM), and the
    cache answers only for a bit-identical input, so every forward computes what it would without it.
    """
    encoder = model.sam.vision_encoder
    forward = encoder.forward
    seen: list = []

    def cached(pixel_values, *args, **kwargs):
        for key, value in seen:
            if key.shape == pixel_values.shape and key.dtype == pixel_values.dtype and torch.equal(key, pixel_values):
                return value
        value = forward(pixel_values, *args, **kwargs)
        seen.append((pixel_values.clone(), value))
        return value

    encoder.forward = cached
    try:
        yield
    finally:
        del encoder.forward


REPO = Path(__file__).resolve().parents[1]


def load_script(path: Path, name: str):
    """A script of tools/ or experiments/ (not packages) as a module named `name`, registered in
    sys.modules because dataclasses resolve their module by name."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def compare_tool():
    """tools/compare.py as a module."""
    return load_script(REPO / "tools" / "compare.py", "compare_tool")


@pytest.fixture(scope="session")
def deep_tiny_model(tiny_model):
    """The tiny model with a 32-layer LLM (LLaMA-7B's depth, tiny width): for in-LLM schedules at real layers."""
    from dataclasses import replace

    from litelvlm.models.lvlm import PixelGroundingLVLM

    config = replace(tiny_model.config, llm=replace(tiny_model.config.llm, num_layers=32))
    text = tiny_model.text_tower.config
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        model = PixelGroundingLVLM(config, tiny_model.seg_token_id, (text.bos_token_id, text.eos_token_id, text.pad_token_id))
    finally:
        torch.random.set_rng_state(state)
    model.clip_tokenizer = tiny_model.clip_tokenizer
    return model.eval()
