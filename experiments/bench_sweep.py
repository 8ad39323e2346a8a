"""What a one-pass sweep saves: P configurations in one run vs P separate runs, and vs the ideal.

    python experiments/bench_sweep.py [--configs none fastv@64 vispruner@64 litelvlm@64]
                                      [--images 1] [--llm-layers 3] [--json PATH]

The model has random weights but sizes where the encoders matter: a CLIP ViT-L/14-336 vision tower
(24 layers, width 1024, 576 patches), a CLIP-L text tower, a SAM ViT-B image encoder (12 layers,
width 768, 1024 px) and a few LLaMA layers of the 7B width (4096, MLP 11008). Built once and shared
by every run below, so model loading (which separate runs would also repeat) is not counted.

- sweep: one `Trainer.validate` of the module with all P configurations (the framework as used:
  data loading, scoring, metrics, per-sample records).
- separate: P `Trainer.validate` runs, one configuration each (each recomputes CLIP and SAM).
- ideal: the model work alone, on the same batches: one encoder pass plus P pruner-dependent
  passes (selection, LLM prefill, SAM mask decoding), timed without the framework.
A warm-up pass (not timed) runs first so that no measurement pays one-time costs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import lightning as L
import torch

from litelvlm.data.datamodule import ReferringDataModule
from litelvlm.engine.callbacks import SampleRecords
from litelvlm.engine.module import ReferringSegmentationModule
from litelvlm.models.config import CLIPTextSpec, CLIPVisionSpec, LLMSpec, LVLMConfig, SAMSpec
from litelvlm.models.loading import load_assets
from litelvlm.models.lvlm import PixelGroundingLVLM
from litelvlm.models.tokenizer import special_token_ids
from litelvlm.pruners import TokenPruner, build_pruner

DEFAULT_CONFIGS = ["none", "fastv@64", "vispruner@64", "litelvlm@64"]
SAM_B = SAMSpec(hidden_size=768, num_layers=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11), mlp_dim=3072)


def benchmark_config(llm_layers: int) -> LVLMConfig:
    """Real sizes (see the module docstring), the tiny tokenizers' vocabularies."""
    tiny = load_assets("tiny-glamm").config
    return replace(
        tiny,
        name="bench-clip-l-sam-b-llama-7b-width",
        vision=CLIPVisionSpec(),
        text=replace(CLIPTextSpec(), vocab_size=tiny.text.vocab_size),
        llm=replace(LLMSpec(), num_layers=llm_layers, vocab_size=tiny.llm.vocab_size),
        sam=SAM_B,
    )


def build_benchmark_model(
    llm_layers: int, device: torch.device, seed: int = 0, config: LVLMConfig | None = None
) -> PixelGroundingLVLM:
    """Random weights at real sizes (or `config`'s), with the tiny tokenizers (so the demo data feeds it as is)."""
    assets = load_assets("tiny-glamm")
    config = config or benchmark_config(llm_layers)
    clip = assets.clip_tokenizer
    pad = clip.pad_token_id if clip.pad_token_id is not None else clip.eos_token_id
    torch.manual_seed(seed)
    model = PixelGroundingLVLM(config, special_token_ids(assets.llm_tokenizer).seg, (clip.bos_token_id, clip.eos_token_id, pad))
    model.clip_tokenizer = clip
    return model.to(device).eval().requires_grad_(False)


def parse_configuration(spec: str) -> TokenPruner:
    """`none`, `fastv@64`, `litelvlm@192`: a pruner and its budget."""
    name, _, budget = spec.partition("@")
    return build_pruner(name, num_tokens=int(budget)) if budget else build_pruner(name)


def module_with(lvlm: PixelGroundingLVLM, pruners: list[TokenPruner]) -> ReferringSegmentationModule:
    """The framework's module, its (tiny) model swapped for the shared benchmark model."""
    if len(pruners) == 1:
        module = ReferringSegmentationModule("tiny-glamm", pruner=pruners[0])
    else:
        module = ReferringSegmentationModule("tiny-glamm", pruners=pruners)
    module.lvlm = lvlm
    return module


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_validate(module: ReferringSegmentationModule, images: int, device: torch.device) -> tuple[float, list[dict]]:
    """Wall time of one `Trainer.validate` over the first `images` demo images (one per batch)."""
    data = ReferringDataModule(batch_size=1, max_sentences=3)
    with tempfile.TemporaryDirectory() as folder:
        trainer = L.Trainer(
            accelerator=device.type,
            devices=1,
            logger=False,
            callbacks=[SampleRecords()],
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=images,
            default_root_dir=folder,
        )
        synchronize(device)
        start = time.perf_counter()
        trainer.validate(module, datamodule=data, verbose=False)
        synchronize(device)
        return time.perf_counter() - start, module.last_results


def timed_ideal(lvlm: PixelGroundingLVLM, pruners: list[TokenPruner], batches: list, device: torch.device) -> dict:
    """One encoder pass plus one pruner-dependent pass per configuration, per batch, nothing else."""
    encode_seconds, ground_seconds = 0.0, [0.0] * len(pruners)
    with torch.inference_mode():
        for batch in batches:
            synchronize(device)
            start = time.perf_counter()
            shared = lvlm.encode(batch, pruners)
            synchronize(device)
            encode_seconds += time.perf_counter() - start
            for index, pruner in enumerate(pruners):
                start = time.perf_counter()
                lvlm.ground(batch, shared, pruner)
                synchronize(device)
                ground_seconds[index] += time.perf_counter() - start
    return {"encode": encode_seconds, "ground": ground_seconds}


def to_device(batch, device: torch.device):
    for name, value in vars(batch).items():
        if isinstance(value, torch.Tensor):
            setattr(batch, name, value.to(device))
        elif isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
            setattr(batch, name, [item.to(device) for item in value])
    return batch


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, help="configurations: name or name@budget")
    parser.add_argument("--images", type=int, default=1, help="demo images evaluated (one per batch)")
    parser.add_argument("--llm-layers", type=int, default=3, help="LLaMA layers of the 7B width (FastV needs >= 3)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, help="write the numbers here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    L.seed_everything(0, verbose=False)

    start = time.perf_counter()
    lvlm = build_benchmark_model(args.llm_layers, device)
    build_seconds = time.perf_counter() - start
    pruners = [parse_configuration(spec) for spec in args.configs]
    data = ReferringDataModule(batch_size=1, max_sentences=3)
    loader = iter(data.val_dataloader())
    batches = [to_device(next(loader), device) for _ in range(args.images)]

    timed_ideal(lvlm, pruners, batches[:1], device)  # warm-up, not counted
    ideal = timed_ideal(lvlm, pruners, batches, device)
    sweep_seconds, sweep_results = timed_validate(module_with(lvlm, pruners), args.images, device)
    separate = [timed_validate(module_with(lvlm, [pruner]), args.images, device) for pruner in pruners]
    separate_seconds = sum(seconds for seconds, _ in separate)
    # The sweep's numbers are the separate runs' numbers (what makes the saving free).
    for row, (_, single) in zip(sweep_results, separate):
        if (row["ciou"], row["giou"], row["num_samples"]) != (single["ciou"], single["giou"], single["num_samples"]):
            raise AssertionError(f"sweep and separate run disagree on {row['configuration']}: {row} vs {single}")

    ideal_seconds = ideal["encode"] + sum(ideal["ground"])
    report = {
        "num_configs": len(pruners),
        "configurations": [row["configuration"] for row in sweep_results],
        "images": args.images,
        "sweep_seconds": sweep_seconds,
        "separate_seconds": separate_seconds,
        "ideal_seconds": ideal_seconds,
        "sweep_over_ideal": sweep_seconds / ideal_seconds,
        "separate_over_sweep": separate_seconds / sweep_seconds,
        "sweep_within_1_2x_of_ideal": sweep_seconds <= 1.2 * ideal_seconds,
        "sweep_faster_than_separate": sweep_seconds < separate_seconds,
        "encode_seconds": ideal["encode"],
        "ground_seconds": dict(zip([row["configuration"] for row in sweep_results], ideal["ground"])),
        "separate_run_seconds": [seconds for seconds, _ in separate],
        "model_build_seconds": build_seconds,
        "model": {
            "vision": "CLIP ViT-L/14-336 (24 x 1024)",
            "sam_encoder": "SAM ViT-B (12 x 768, 1024 px)",
            "llm": f"{args.llm_layers} LLaMA layers of width 4096 (MLP 11008)",
            "parameters_millions": round(sum(p.numel() for p in lvlm.parameters()) / 1e6, 1),
        },
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    print(
        f"{len(pruners)} configurations x {args.images} image(s) on {report['device']}: "
        f"sweep {sweep_seconds:.1f} s, separate runs {separate_seconds:.1f} s "
        f"({report['separate_over_sweep']:.2f}x the sweep), ideal {ideal_seconds:.1f} s "
        f"(sweep / ideal = {report['sweep_over_ideal']:.3f})"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"written to {args.json}")
    return report


if __name__ == "__main__":
    main()
