"""What an encoders-only study run saves: the reversal study alone vs riding along a full validation.

    python experiments/bench_studies.py [--images 1] [--repeats 3] [--llm-layers 1] [--sam-layers 1]
                                        [--vision-layers 2] [--json PATH]

Both runs are `Trainer.validate` of the framework's module with `SimilarityReversalStudy` (and the
per-sample records the CLI adds) on the same demo images, one image per batch:
- full: `encoders_only=False`, the normal evaluation (CLIP, LLM, SAM, IoU) with the study reading
  the module's encodings;
- encoders-only: `encoders_only=True`, the CLIP passes the study needs and nothing else.
The two write the same reversal.json (checked). One untimed warm-up run of each comes first; then
`--repeats` timed runs of each, interleaved, and each mode's fastest run counts (the one least
slowed by other work on the machine; the medians are reported too).

The model has random weights and every part at its real width but a fraction of its depth, so the
run fits a couple of CPU cores in about a minute: CLIP ViT-L/14-336 vision with `--vision-layers`
of 24 layers (576 patches; the study reads its last layer), CLIP-L's text tower, a SAM ViT-H image
encoder with `--sam-layers` of 32 layers at 1024 px, and `--llm-layers` of LLaMA-7B's 32 layers.
CLIP keeps a larger share of its depth than SAM and the LLM, so the ratio overstates what an
encoders-only run costs at full size.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import lightning as L
import torch
from bench_prefill import load_average, warn_if_loaded
from bench_sweep import benchmark_config, build_benchmark_model, synchronize

from litelvlm.analysis import SimilarityReversalStudy
from litelvlm.data.datamodule import ReferringDataModule
from litelvlm.engine.callbacks import SampleRecords
from litelvlm.engine.module import ReferringSegmentationModule
from litelvlm.models.config import LVLMConfig, SAMSpec
from litelvlm.models.lvlm import PixelGroundingLVLM
from litelvlm.pruners import NoPruning


def bench_config(vision_layers: int, sam_layers: int, llm_layers: int) -> LVLMConfig:
    """Real widths, reduced depths: see the module docstring."""
    base = benchmark_config(llm_layers)
    return replace(
        base,
        name=f"bench-studies-clip-l{vision_layers}-sam-h{sam_layers}-llama-7b-width{llm_layers}",
        vision=replace(base.vision, num_layers=vision_layers),
        sam=replace(SAMSpec(), num_layers=sam_layers, global_attn_indexes=(sam_layers - 1,)),
    )


def timed_study_run(lvlm: PixelGroundingLVLM, encoders_only: bool, images: int, device: torch.device) -> tuple[float, dict]:
    """Wall time of one `Trainer.validate` with the reversal study over the first `images` demo images, and its JSON."""
    module = ReferringSegmentationModule("tiny-glamm", pruner=NoPruning(), encoders_only=encoders_only)
    module.lvlm = lvlm  # the framework's module, its tiny model swapped for the benchmark model
    data = ReferringDataModule(batch_size=1, max_sentences=3)
    with tempfile.TemporaryDirectory() as folder:
        trainer = L.Trainer(
            accelerator=device.type,
            devices=1,
            logger=False,
            callbacks=[SampleRecords(), SimilarityReversalStudy()],
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=images,
            default_root_dir=folder,
        )
        synchronize(device)
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):  # the study says where it wrote; not needed here
            trainer.validate(module, datamodule=data, verbose=False)
        synchronize(device)
        seconds = time.perf_counter() - start
        return seconds, json.loads((Path(folder) / "reversal.json").read_text())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1, help="demo images per run (one per batch)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each mode, interleaved (fastest counts)")
    parser.add_argument("--vision-layers", type=int, default=2, help="CLIP-L vision layers (>= 2: the study reads the last)")
    parser.add_argument("--sam-layers", type=int, default=1, help="SAM ViT-H image encoder layers")
    parser.add_argument("--llm-layers", type=int, default=1, help="LLaMA layers of the 7B width")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, help="write the numbers here")
    args = parser.parse_args(argv)
    if min(args.images, args.repeats, args.sam_layers, args.llm_layers) < 1 or args.vision_layers < 2:
        parser.error("--images, --repeats, --sam-layers and --llm-layers must be at least 1, --vision-layers at least 2")
    device = torch.device(args.device)
    L.seed_everything(0, verbose=False)
    config = bench_config(args.vision_layers, args.sam_layers, args.llm_layers)
    lvlm = build_benchmark_model(args.llm_layers, device, config=config)

    load_before = load_average()
    for encoders_only in (False, True):  # warm-up, not counted
        timed_study_run(lvlm, encoders_only, 1, device)
    times: dict[bool, list[float]] = {False: [], True: []}
    reports: list[dict] = []
    for _ in range(args.repeats):
        for encoders_only in (False, True):
            seconds, reversal = timed_study_run(lvlm, encoders_only, args.images, device)
            times[encoders_only].append(seconds)
            reports.append(reversal)
    if any(reversal != reports[0] for reversal in reports):
        raise AssertionError("the encoders-only and full runs wrote different reversal.json files")
    warn_if_loaded(load_before, device.type)

    full_seconds, encoders_seconds = min(times[False]), min(times[True])
    ratio = encoders_seconds / full_seconds
    report = {
        "images": args.images,
        "sentences": reports[0]["num_sentences"],
        "repeats": args.repeats,
        "full_validation_seconds": full_seconds,
        "encoders_only_seconds": encoders_seconds,
        "encoders_only_over_full": ratio,
        "full_validation_runs_seconds": times[False],
        "encoders_only_runs_seconds": times[True],
        "median_ratio": statistics.median(times[True]) / statistics.median(times[False]),
        "model": {
            "vision": f"CLIP ViT-L/14-336, {args.vision_layers} of 24 layers (width 1024, 576 patches)",
            "text": "CLIP-L text tower (12 x 768)",
            "sam_encoder": f"SAM ViT-H, {args.sam_layers} of 32 layers (width 1280, 1024 px)",
            "llm": f"LLaMA-7B width, {args.llm_layers} of 32 layers (4096, MLP 11008)",
            "parameters_millions": round(sum(p.numel() for p in lvlm.parameters()) / 1e6, 1),
        },
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    print(
        f"reversal study over {args.images} image(s), {report['sentences']} sentences, on {report['device']} "
        f"({report['torch_threads']} threads), fastest of {args.repeats}: full validation {full_seconds:.2f} s, "
        f"encoders-only {encoders_seconds:.2f} s, ratio {ratio:.3f} (medians: {report['median_ratio']:.3f}; "
        "same reversal.json)"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"written to {args.json}")
    return report


if __name__ == "__main__":
    main()
