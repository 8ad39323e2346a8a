"""The paper's efficiency table for GLaMM-7B, counted: FLOPs of every stage per pruning strategy.

    python tools/efficiency_table.py [--text-tokens 126] [--checkpoint FOLDER] [--json PATH] [--time]

The 7B architecture is built on the `meta` device (shapes only: no weights, no memory) and one
representative sample, one image with the 3-sentence default prompt, goes through the real forward
under torch's FlopCounterMode, for no pruning and for FastV (both variants), VisPruner, LiteLVLM, FasterVLM,
DivPrune, CDPruner, VisionZip, PyramidDrop, DART and SparseVLM at 192 and 64 kept tokens (SparseVLM: its equivalent
budget). The LLM column is in 10^12 multiply-accumulates of the LLM decoder (the published convention); the
other columns are FLOPs (2 per multiply-accumulate) per stage.
In-LLM methods change the sequence between layers, so each decoder layer is also counted on its own, on the
sequence it actually ran (`llm_macs_per_layer` in the JSON; `avg vis` = visual tokens averaged over the layers:
PyramidDrop's budget, DART's 4 + 8 * (R // 8) from layer 2 on).

The real LLaMA tokenizer is not needed: the prompt is `--text-tokens` ids (126, the length the
published figures imply) with the image sentinel and 3 [SEG] tokens; with `--checkpoint FOLDER`
the default prompt is tokenised by that checkpoint's LLaMA tokenizer instead. The CLIP text tower
reads the three questions, tokenised by the project's tiny stand-in of CLIP's BPE tokenizer
(`--clip-tokenizer FOLDER` to use CLIP's own).

`--time` (CUDA only) also times random-weight runs of the same sample on the GPU: prefill and
end-to-end milliseconds and peak memory, medians over repetitions after warm-up.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import sys
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from litelvlm.engine.callbacks.profiler import (
    NESTED_STAGES,
    STAGES,
    StageTimer,
    count_stage_flops,
    flop_counter,
    kv_cache_bytes,
    llm_kv_geometry,
    observing,
)
from litelvlm.engine.strategies import Strategy, efficiency_strategies
from litelvlm.models.batch import GroundingBatch
from litelvlm.models.config import LVLMConfig
from litelvlm.models.lvlm import IMAGE_TOKEN_INDEX, PixelGroundingLVLM
from litelvlm.models.prompts import build_glamm_prompt
from litelvlm.pruners import TokenPruner, VisualReduction, VisualSignals

DEFAULT_SENTENCES = ("the man in the red shirt", "the dog on the left", "the white car behind the bus")
DEFAULT_TEXT_TOKENS = 126
BUDGETS = (192, 64)
IMAGE_POSITION = 35  # text tokens before the image in GLaMM's prompt (system prompt, "USER: The <im_start>")
ORIGINAL_SIZE = (480, 640)  # a COCO-sized image; only the final mask resize depends on it
# Published LLM FLOPs of GLaMM-7B (the LiteLVLM paper; docs/models.md, "Published efficiency figures"),
# in 10^12 MACs, by (pruner, kept tokens).
PUBLISHED_LLM_TMACS = {
    ("none", 576): 4.66,
    ("fastv", 192): 2.65,
    ("fastv", 64): 2.23,
    ("vispruner", 192): 2.17,
    ("vispruner", 64): 1.33,
    ("litelvlm", 192): 2.11,
    ("litelvlm", 64): 1.27,
}
STAGE_LABELS = {
    "clip_vision": "CLIP vis",
    "clip_text": "CLIP text",
    "pruner_select": "select",
    "llm_prefill": "LLM+proj",
    "sam_image_encoder": "SAM enc",
    "sam_decoder": "SAM dec",
}


def default_strategies(budgets=BUDGETS) -> list[Strategy]:
    return efficiency_strategies(budgets)


class HostSelection(TokenPruner):
    """Runs a pre-LLM pruner on a meta-device model: its real `reduce` (selection or merge) gets seeded
    random host tensors shaped like the (valueless) meta signals, so its own cost is counted and the
    tokens it returns have the right shape. Which tokens it keeps does not change any count."""

    def __init__(self, pruner: TokenPruner) -> None:
        super().__init__(num_tokens=pruner.num_tokens, kept_order=pruner.kept_order, position_ids=pruner.position_ids)
        self.pruner = pruner
        self.group_names = pruner.group_names
        self.text_source = getattr(pruner, "text_source", "question")
        self.text_overflow = getattr(pruner, "text_overflow", "truncate")  # chunked text: more CLIP text rows

    @property
    def name(self) -> str:
        return self.pruner.name

    @property
    def required_signals(self):
        return self.pruner.required_signals

    def reduce(self, signals: VisualSignals) -> VisualReduction:
        generator = torch.Generator().manual_seed(0)

        def on_host(value):
            if isinstance(value, tuple):
                return tuple(on_host(item) for item in value)
            if not isinstance(value, torch.Tensor) or not value.is_meta:
                return value
            if value.dtype == torch.bool:
                return torch.ones(value.shape, dtype=torch.bool)
            return torch.randn(value.shape, generator=generator).to(value.dtype)

        host = replace(signals, **{f.name: on_host(getattr(signals, f.name)) for f in fields(signals)})
        return self.pruner.reduce(host).to("meta")


@dataclass
class Sample:
    """The representative sample: prompt ids (with the image sentinel), questions, and where they came from."""

    input_ids: list[int]
    questions: list[str]
    seg_id: int
    clip_tokenizer: object
    source: str

    @property
    def text_tokens(self) -> int:
        return len(self.input_ids) - 1  # the image sentinel becomes the visual tokens


def synthetic_prompt_ids(text_tokens: int, seg_id: int, num_masks: int, filler_id: int = 1) -> list[int]:
    """`text_tokens` ids laid out as GLaMM's prompt: text, the image sentinel, then rounds each ending
    in [SEG] and one more token. Only shapes matter for counting; the ids are placeholders."""
    after_image = text_tokens - IMAGE_POSITION
    if after_image < 2 * num_masks:
        raise SystemExit(f"--text-tokens {text_tokens} is too short for a prompt with {num_masks} [SEG] tokens")
    ids = [filler_id] * IMAGE_POSITION + [IMAGE_TOKEN_INDEX] + [filler_id] * after_image
    round_length = after_image // num_masks
    for index in range(num_masks):  # [SEG] two tokens before each round's end, as in "...is [SEG].</s>"
        ids[IMAGE_POSITION + 1 + (index + 1) * round_length - 2] = seg_id
    return ids


def default_sample(text_tokens: int, checkpoint: str | None, clip_tokenizer_folder: str | None) -> Sample:
    """The 3-sentence default prompt: `text_tokens` placeholder ids, or tokenised by a checkpoint."""
    from litelvlm.models.tiny_assets import ensure_tiny_tokenizers
    from litelvlm.models.tokenizer import load_clip_tokenizer, load_llm_tokenizer, special_token_ids, tokenize_prompt

    prompt = build_glamm_prompt(list(DEFAULT_SENTENCES), random.Random(0))
    if clip_tokenizer_folder:
        clip_tokenizer, clip_source = load_clip_tokenizer(clip_tokenizer_folder), clip_tokenizer_folder
    else:
        clip_tokenizer = load_clip_tokenizer(Path(ensure_tiny_tokenizers()) / "clip")
        clip_source = "the project's tiny stand-in (one token per word here, as CLIP's)"
    if checkpoint:
        tokenizer = load_llm_tokenizer(checkpoint)
        ids = tokenize_prompt(tokenizer, prompt.text)
        seg_id = special_token_ids(tokenizer).seg
        source = f"default prompt tokenised by {checkpoint}"
    else:
        seg_id = 32005  # GLaMM's [SEG] id; a placeholder here, only shapes are counted
        ids = synthetic_prompt_ids(text_tokens, seg_id, len(prompt.questions))
        source = "--text-tokens placeholder ids"
    return Sample(ids, prompt.questions, seg_id, clip_tokenizer, f"{source}; CLIP text tokenizer: {clip_source}")


def clip_text_ids(clip_tokenizer) -> tuple[int, int, int]:
    pad = clip_tokenizer.pad_token_id if clip_tokenizer.pad_token_id is not None else clip_tokenizer.eos_token_id
    return clip_tokenizer.bos_token_id, clip_tokenizer.eos_token_id, pad


def build_model(config: LVLMConfig, sample: Sample, device: str, dtype: torch.dtype) -> PixelGroundingLVLM:
    """The architecture on `device`: on meta a shape-only model; elsewhere random weights."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # create the weights in the run's dtype (7B in float32 would not fit a GPU twice)
    try:
        with torch.device(device):
            model = PixelGroundingLVLM(config, sample.seg_id, clip_text_ids(sample.clip_tokenizer))
    finally:
        torch.set_default_dtype(previous)
    model.clip_tokenizer = sample.clip_tokenizer
    return model.requires_grad_(False).eval()


def sample_batch(config: LVLMConfig, sample: Sample, device: str, dtype: torch.dtype) -> GroundingBatch:
    """One image and its prompt as the model's batch. Image sizes stay host tensors (read as ints)."""
    num_masks = len(sample.questions)
    height, width = ORIGINAL_SIZE
    sam_size, clip_size = config.sam.image_size, config.vision.image_size
    scale = sam_size / max(height, width)
    input_ids = torch.tensor([sample.input_ids])
    make = torch.empty if device == "meta" else torch.randn
    return GroundingBatch(
        clip_pixel_values=make(1, 3, clip_size, clip_size, device=device, dtype=dtype),
        sam_pixel_values=make(1, 3, sam_size, sam_size, device=device, dtype=dtype),
        sam_resized_sizes=torch.tensor([[round(height * scale), round(width * scale)]]),
        original_sizes=torch.tensor([[height, width]]),
        input_ids=input_ids.to(device),
        attention_mask=torch.ones_like(input_ids).to(device),
        questions=[list(sample.questions)],
        expressions=[list(DEFAULT_SENTENCES[:num_masks])],
        gt_masks=[torch.zeros(num_masks, height, width, dtype=torch.bool, device=device)],
        sample_ids=torch.tensor([0]),
    )


@contextlib.contextmanager
def per_layer_macs(model: PixelGroundingLVLM):
    """Multiply-accumulates of each decoder layer's own run, counted on the sequence it actually ran
    (hooks around every layer; an in-LLM pruner's scoring between layers is not in any layer).
    Yields the list, filled in layer order as the forward runs."""
    macs: list[int] = []
    counters: list = []

    def enter(module, args, kwargs):
        counters.append(flop_counter().__enter__())

    def leave(module, args, kwargs, output):
        counter = counters.pop()
        counter.__exit__(None, None, None)
        macs.append(counter.get_total_flops() // 2)

    layers = model.llm.model.layers
    handles = [layer.register_forward_pre_hook(enter, with_kwargs=True) for layer in layers]
    handles += [layer.register_forward_hook(leave, with_kwargs=True) for layer in layers]
    try:
        yield macs
    finally:
        for handle in handles:
            handle.remove()


def count_row(model: PixelGroundingLVLM, batch: GroundingBatch, strategy: Strategy, sample: Sample) -> dict:
    """FLOPs by stage, the LLM's multiply-accumulates (in all and per layer) and KV-cache bytes of one strategy.

    `llm_macs` is the decoder stage: every layer on the sequence it ran, plus what an in-LLM pruner
    computes between layers (`llm_selection_macs`, e.g. FastV's and PyramidDrop's attention rows)."""
    pruner = strategy.build()
    runner = pruner if pruner.acts_in_llm else HostSelection(pruner)
    with per_layer_macs(model) as layer_macs:
        output, flops = count_stage_flops(model, lambda: model(batch, runner))
    num_tokens = strategy.num_tokens or model.num_patches
    return {
        "pruner": strategy.pruner,
        "mode": strategy.mode,
        "num_tokens": num_tokens,
        "text_tokens": sample.text_tokens,
        "llm_macs": flops["llm_decoder"] // 2,
        "llm_macs_per_layer": list(layer_macs),
        "llm_selection_macs": flops["llm_decoder"] // 2 - sum(layer_macs),  # the final norm counts no FLOPs
        "visual_tokens_per_layer": list(output.visual_tokens_per_layer),
        "total_flops": sum(count for stage, count in flops.items() if stage not in NESTED_STAGES),
        "flops_by_stage": flops,
        "kv_cache_bytes": kv_cache_bytes(output.sequence_length_per_layer, *llm_kv_geometry(model)),
        "sequence_length_per_layer": list(output.sequence_length_per_layer),
        "published_llm_tmacs": (
            PUBLISHED_LLM_TMACS.get((strategy.pruner, num_tokens)) if model.config.name == "glamm-7b" else None
        ),
    }


def efficiency_rows(
    preset: str = "glamm-7b",
    sample: Sample | None = None,
    strategies: list[Strategy] | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> list[dict]:
    """Count every strategy's row on a meta-device model of `preset` (default sample: 126 text tokens)."""
    sample = sample or default_sample(DEFAULT_TEXT_TOKENS, None, None)
    config = LVLMConfig.from_name(preset)
    model = build_model(config, sample, "meta", dtype)
    batch = sample_batch(config, sample, "meta", dtype)
    rows = [count_row(model, batch, strategy, sample) for strategy in strategies or default_strategies()]
    for row in rows:
        row["model"], row["sample"] = preset, sample.source
    return rows


def time_rows_on_cuda(
    rows: list[dict], preset: str, sample: Sample, dtype: torch.dtype, warmup: int = 3, repeats: int = 10
) -> None:
    """Add median prefill / end-to-end milliseconds and peak memory of random-weight GPU runs to `rows`."""
    config = LVLMConfig.from_name(preset)
    model = build_model(config, sample, "cuda", dtype)
    batch = sample_batch(config, sample, "cuda", dtype)
    for row in rows:
        pruner = Strategy(row["pruner"], None if row["pruner"] == "none" else row["num_tokens"], row["mode"]).build()
        pruner = pruner.to("cuda")
        runs = []
        for index in range(warmup + repeats):
            with observing(model, StageTimer("cuda")) as timer, torch.no_grad():
                model(batch, pruner)
            if index >= warmup:
                runs.append(timer.finish())
        row["cuda_prefill_ms"] = statistics.median(run["time_ms"]["llm_prefill"] for run in runs)
        row["cuda_end_to_end_ms"] = statistics.median(run["end_to_end_ms"] for run in runs)
        row["cuda_peak_memory_bytes"] = max(max(run["peak_memory_bytes"].values()) for run in runs)
    del model
    torch.cuda.empty_cache()


def format_table(rows: list[dict]) -> str:
    """The paper-style table and the per-stage FLOPs behind it."""
    stages = [stage for stage in STAGES if any(stage in row["flops_by_stage"] for row in rows)]
    timed = all("cuda_prefill_ms" in row for row in rows)
    header = f"{'strategy':<16}{'tokens':>7}{'avg vis':>8}{'LLM 1e12 MAC':>14}{'published':>11}{'total TFLOP':>13}{'KV MiB':>9}"
    if timed:
        header += f"{'prefill ms':>12}{'CUDA ms':>10}{'peak GiB':>10}"
    lines = [header, "-" * len(header)]
    for row in rows:
        label = f"{row['pruner']}-{row['mode']}" if row["mode"] else row["pruner"]
        published = row["published_llm_tmacs"]
        line = (
            f"{label:<16}{row['num_tokens']:>7}{statistics.fmean(row['visual_tokens_per_layer']):>8.1f}"
            f"{row['llm_macs'] / 1e12:>14.2f}"
            f"{'' if published is None else f'{published:.2f}':>11}{row['total_flops'] / 1e12:>13.2f}"
            f"{row['kv_cache_bytes'] / 2**20:>9.0f}"
        )
        if timed:
            line += (
                f"{row['cuda_prefill_ms']:>12.2f}{row['cuda_end_to_end_ms']:>10.2f}"
                f"{row['cuda_peak_memory_bytes'] / 2**30:>10.2f}"
            )
        lines.append(line)
    stage_header = f"{'strategy':<16}{'tokens':>7}" + "".join(f"{STAGE_LABELS[stage]:>11}" for stage in stages)
    lines += ["", "FLOPs by stage, 10^9 (GFLOP):", stage_header]
    for row in rows:
        label = f"{row['pruner']}-{row['mode']}" if row["mode"] else row["pruner"]
        per_stage = "".join(f"{row['flops_by_stage'].get(stage, 0) / 1e9:>11.1f}" for stage in stages)
        lines.append(f"{label:<16}{row['num_tokens']:>7}{per_stage}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="glamm-7b", help="model architecture preset (default glamm-7b)")
    parser.add_argument("--text-tokens", type=int, default=DEFAULT_TEXT_TOKENS, help="prompt length without a checkpoint")
    parser.add_argument("--checkpoint", help="a GLaMM checkpoint folder: tokenise the default prompt with its tokenizer")
    parser.add_argument("--clip-tokenizer", help="a CLIP checkpoint folder whose tokenizer reads the questions")
    parser.add_argument("--budgets", type=int, nargs="+", default=list(BUDGETS), help="kept visual tokens (default 192 64)")
    parser.add_argument(
        "--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"], help="for KV bytes and --time"
    )
    parser.add_argument("--json", type=Path, help="write the rows as a JSON list here")
    parser.add_argument("--time", action="store_true", help="also time random-weight runs on the GPU (CUDA only)")
    args = parser.parse_args(argv)
    if args.time and not torch.cuda.is_available():
        parser.error("--time needs a CUDA GPU; FLOPs and KV bytes need none")
    dtype = getattr(torch, args.dtype)
    sample = default_sample(args.text_tokens, args.checkpoint, args.clip_tokenizer)
    rows = efficiency_rows(args.preset, sample, default_strategies(args.budgets), dtype)
    if args.time:
        time_rows_on_cuda(rows, args.preset, sample, dtype)
    print(
        f"{args.preset}, one image, {len(sample.questions)} sentences, {sample.text_tokens} text tokens "
        f"({sample.source}). FLOPs counted with FlopCounterMode on the meta device; KV cache at {args.dtype}."
    )
    print(format_table(rows))
    print("FastV's published column matches neither variant: `inplace` is what dropping tokens after layer K "
          "costs, `mask` keeps every token (docs/models.md, \"Published efficiency figures\").")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
        print(f"rows written to {args.json}")
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
