"""Does pruning save prefill time in proportion to the FLOPs it saves? A CPU (or GPU) benchmark.

    python experiments/bench_prefill.py [--layers 3] [--repeats 3] [--warmup 1] [--dtype bfloat16] [--json PATH]

Builds the project's model with random weights at real widths but reduced depth, so that it fits a
laptop: a LLaMA decoder of the 7B width (4096, 32 heads, MLP 11008) with `--layers` layers; CLIP-L's
full text tower (12 layers, width 768: LiteLVLM's text cost at full size); CLIP-L's vision width with
two layers (the first feeds the LLM, the second is the last layer whose q/k/v LiteLVLM reads: its
extra vision cost at full size); a tiny SAM that is not timed. One sample (one image, the
3-sentence default prompt, 126 text tokens) runs the real forward for every strategy and budget.

For each row, medians over repetitions (rows interleaved, after warm-up):
  prefill_ms   the llm_prefill stage: projector + decoder on the pruned sequence (FastV's scoring
               and dropping included: FastV acts inside it);
  overhead_ms  the pruner's own cost outside the LLM: CLIP text tower + selection + the vision
               signals it needs beyond the baseline's;
  time_ratio   (prefill_ms + w * overhead_ms) / prefill_ms of no pruning, with w = layers / 32:
               the overhead weighed against a full 32-layer LLM, as in the real model (w = 1 at
               --layers 32);
  flops_ratio  counted FLOPs of the same llm_prefill stage / no pruning's (FlopCounterMode);
  quotient     time_ratio / flops_ratio: 1 = time saved in proportion to FLOPs; above 1 = the
               pruner's overhead, or kernels less efficient on short sequences, eat the saving.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import torch

from litelvlm.engine.callbacks.profiler import StageFlopCounter, StageTimer, observing
from litelvlm.engine.strategies import Strategy, efficiency_strategies
from litelvlm.models.batch import GroundingBatch
from litelvlm.models.config import CLIPTextSpec, CLIPVisionSpec, LLMSpec, LVLMConfig
from litelvlm.models.lvlm import IMAGE_TOKEN_INDEX, PixelGroundingLVLM
from litelvlm.models.prompts import build_glamm_prompt

FULL_DEPTH = 32  # LLaMA-7B's layers
TEXT_TOKENS = 126
IMAGE_POSITION = 35
SENTENCES = ("the man in the red shirt", "the dog on the left", "the white car behind the bus")
BUDGETS = (576, 192, 64)
OVERHEAD_STAGES = ("clip_text", "pruner_select")


def strategies(budgets=BUDGETS) -> list[Strategy]:
    return efficiency_strategies(budgets, baseline_tokens=576)


def bench_config(layers: int) -> LVLMConfig:
    """Real widths, reduced depth: see the module docstring."""
    tiny = LVLMConfig.from_name("tiny-glamm")
    return LVLMConfig(
        name=f"bench-7b-width-{layers}-layers",
        vision=replace(CLIPVisionSpec(), num_layers=2),
        text=CLIPTextSpec(),
        llm=replace(LLMSpec(), num_layers=layers, vocab_size=1024),
        sam=replace(tiny.sam, image_size=256),
        clip_checkpoint="",
    )


def build_model(layers: int, device: str, dtype: torch.dtype):
    from litelvlm.models.tiny_assets import ensure_tiny_tokenizers
    from litelvlm.models.tokenizer import load_clip_tokenizer

    clip_tokenizer = load_clip_tokenizer(Path(ensure_tiny_tokenizers()) / "clip")
    pad = clip_tokenizer.pad_token_id if clip_tokenizer.pad_token_id is not None else clip_tokenizer.eos_token_id
    torch.manual_seed(0)
    seg_id = 1000
    clip_ids = (clip_tokenizer.bos_token_id, clip_tokenizer.eos_token_id, pad)
    model = PixelGroundingLVLM(bench_config(layers), seg_id, clip_ids)
    model.clip_tokenizer = clip_tokenizer
    return model.to(device=device, dtype=dtype).requires_grad_(False).eval(), seg_id


def sample_batch(config: LVLMConfig, seg_id: int, device: str, dtype: torch.dtype) -> GroundingBatch:
    """One image with the default 3-sentence prompt: 126 text tokens, the image, 3 [SEG] tokens."""
    prompt = build_glamm_prompt(list(SENTENCES), random.Random(0))
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 1000, (TEXT_TOKENS + 1,), generator=generator)
    ids[IMAGE_POSITION] = IMAGE_TOKEN_INDEX
    round_length = (TEXT_TOKENS - IMAGE_POSITION) // 3
    for index in range(3):
        ids[IMAGE_POSITION + 1 + (index + 1) * round_length - 2] = seg_id
    sam_size, clip_size = config.sam.image_size, config.vision.image_size
    return GroundingBatch(
        clip_pixel_values=torch.randn(1, 3, clip_size, clip_size, generator=generator).to(device, dtype),
        sam_pixel_values=torch.randn(1, 3, sam_size, sam_size, generator=generator).to(device, dtype),
        sam_resized_sizes=torch.tensor([[sam_size, sam_size]]),
        original_sizes=torch.tensor([[sam_size, sam_size]]),
        input_ids=ids[None].to(device),
        attention_mask=torch.ones(1, TEXT_TOKENS + 1, dtype=torch.long, device=device),
        questions=[prompt.questions],
        expressions=[prompt.expressions],
        gt_masks=[torch.zeros(3, sam_size, sam_size, dtype=torch.bool, device=device)],
        sample_ids=torch.tensor([0]),
    )


def run_benchmark(
    layers: int = 3, repeats: int = 3, warmup: int = 1, dtype: torch.dtype = torch.bfloat16, device: str = "cpu"
) -> list[dict]:
    """Time and count every strategy; warm-up runs are the counted ones (never timed)."""
    if layers <= 2:
        raise SystemExit("--layers must be at least 3: FastV keeps every token in layers 0 and 1")
    model, seg_id = build_model(layers, device, dtype)
    batch = sample_batch(model.config, seg_id, device, dtype)
    rows = strategies()
    pruners = {row: row.build().to(device) for row in rows}
    flops, times = {}, {row: [] for row in rows}
    with torch.no_grad():
        for row in rows:
            with observing(model, StageFlopCounter()) as counter:
                model(batch, pruners[row])
            flops[row] = counter.flops
            for _ in range(warmup - 1):
                model(batch, pruners[row])
        for _ in range(repeats):
            for row in rows:  # interleaved, so that drifts of the machine hit every row alike
                with observing(model, StageTimer(device)) as timer:
                    model(batch, pruners[row])
                times[row].append(timer.finish()["time_ms"])
    return summarise(rows, flops, times, layers)


def summarise(rows, flops, times, layers) -> list[dict]:
    def median(row, stage):
        return statistics.median(run.get(stage, 0.0) for run in times[row])

    baseline = rows[0]
    weight = layers / FULL_DEPTH
    base_vision_ms = median(baseline, "clip_vision")
    base_prefill_ms, base_prefill_flops = median(baseline, "llm_prefill"), flops[baseline]["llm_prefill"]
    results = []
    for row in rows:
        vision_extra = max(0.0, median(row, "clip_vision") - base_vision_ms)
        overhead_ms = vision_extra + sum(median(row, stage) for stage in OVERHEAD_STAGES)
        prefill_ms = median(row, "llm_prefill")
        time_ratio = (prefill_ms + weight * overhead_ms) / base_prefill_ms
        flops_ratio = flops[row]["llm_prefill"] / base_prefill_flops
        results.append(
            {
                "pruner": row.pruner,
                "mode": row.mode,
                "num_tokens": row.num_tokens,
                "layers": layers,
                "prefill_ms": prefill_ms,
                "overhead_ms": overhead_ms,
                "overhead_weight": weight,
                "time_ratio": time_ratio,
                "prefill_time_ratio": prefill_ms / base_prefill_ms,
                "flops_ratio": flops_ratio,
                "quotient": time_ratio / flops_ratio,
                "prefill_flops": flops[row]["llm_prefill"],
                "overhead_flops": flops[row]["clip_vision"] - flops[baseline]["clip_vision"]
                + sum(flops[row].get(stage, 0) for stage in OVERHEAD_STAGES),
            }
        )
    return results


def format_rows(results: list[dict]) -> str:
    header = (
        f"{'strategy':<16}{'tokens':>7}{'prefill ms':>12}{'overhead ms':>13}"
        f"{'time ratio':>12}{'FLOPs ratio':>13}{'quotient':>10}"
    )
    lines = [header, "-" * len(header)]
    for row in results:
        label = f"{row['pruner']}-{row['mode']}" if row["mode"] else row["pruner"]
        lines.append(
            f"{label:<16}{row['num_tokens']:>7}{row['prefill_ms']:>12.1f}{row['overhead_ms']:>13.1f}"
            f"{row['time_ratio']:>12.3f}{row['flops_ratio']:>13.3f}{row['quotient']:>10.3f}"
        )
    return "\n".join(lines)


def load_average() -> float | None:
    """The machine's 1-minute load average, where the platform has one."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def warn_if_loaded(load_before: float | None, device: str) -> None:
    """Other work on the machine skews CPU timings: say how busy it was, and warn when it was busy."""
    if load_before is None:
        return
    load_after, cpus = load_average(), os.cpu_count() or 1
    print(f"load average: {load_before:.2f} before, {load_after:.2f} after ({cpus} CPUs)")
    if device == "cpu" and (load_before > cpus / 2 or load_after > cpus + 0.5):  # ours adds ~threads
        print("WARNING: other processes competed for the CPUs during this run; its timings are not reliable.")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=3, help="LLM decoder layers at the 7B width (default 3; >= 3)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions per row (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per row first (the first is counted)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", type=Path, help="write the rows as a JSON list here")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 1:
        parser.error("--repeats and --warmup must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = load_average()
    results = run_benchmark(args.layers, args.repeats, args.warmup, getattr(torch, args.dtype), args.device)
    warn_if_loaded(load_before, args.device)
    print(
        f"Prefill of the pruned sequence, LLaMA 7B width x {args.layers} layers, random weights, {args.dtype} on "
        f"{args.device} ({torch.get_num_threads()} threads); 126 text tokens + kept visual tokens; pruner overhead "
        f"measured with CLIP-L's text tower and last vision layer, weighted {args.layers}/{FULL_DEPTH}; medians of "
        f"{args.repeats} after {args.warmup} warm-up."
    )
    print(format_rows(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"rows written to {args.json}")
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
