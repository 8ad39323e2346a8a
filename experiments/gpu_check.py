"""The paper's efficiency table MEASURED on a GPU: time and memory of every registered pruner.

    bash experiments/gpu_check.sh [--out PATH] [--budgets 192 64] [--time-limit 300]   # one CUDA GPU
    bash experiments/gpu_check.sh --smoke [--out PATH]                                  # CPU, seconds

A random-weight GLaMM-7B (`glamm-7b`: CLIP ViT-L/14-336 with 576 patches, LLaMA-7B, SAM ViT-H) is
built directly on the GPU in bfloat16, and the efficiency table's representative sample (one image,
3 sentences, 126 text tokens: tools/efficiency_table.py) runs the real forward for no pruning (576
tokens) and every registered pruner at every budget, FastV in both variants. Pruners come from the
registry, so a method registered later gets its rows without an edit here; a method that fails gets
an error row and the table goes on. Per row, after warm-up forwards, medians over the timed ones:
prefill ms (the llm_prefill stage: projector, splice and decoder; an in-LLM pruner acts inside it),
end-to-end ms (the whole forward), both from CUDA events; peak activation memory (the allocator's
peak during a forward minus what was allocated before it: the weights and the inputs); the visual
tokens each decoder layer ran on. A global time limit stops measuring (remaining rows `skipped`),
and the JSON is rewritten after every row, so a killed run still leaves the rows it measured.

`--smoke`: tiny widths (a 32-layer LLM, so every in-LLM method's layers exist), float32 on CPU,
wall-clock timing, no CUDA call: seconds. Columns and how to run it on a lent GPU: docs/efficiency.md.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import signal
import statistics
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

import torch
import transformers

from litelvlm.engine.callbacks.profiler import StageTimer, observing
from litelvlm.engine.strategies import Strategy, efficiency_strategies
from litelvlm.errors import LitelvlmError
from litelvlm.models.config import DTYPES, LVLMConfig, resolve_dtype
from litelvlm.pruners import list_pruners

REPO = Path(__file__).resolve().parents[1]
BUDGETS = (192, 64)
END_TO_END = "end_to_end"  # the timer span around the whole forward


def efficiency_table_module():
    """tools/efficiency_table.py (tools/ is not a package): its sample, batch and on-device build."""
    spec = importlib.util.spec_from_file_location("efficiency_table", REPO / "tools" / "efficiency_table.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["efficiency_table"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def registry_strategies(budgets, baseline_tokens: int) -> list[Strategy]:
    """The efficiency table's rows (no pruning, FastV in both variants, ...), then every other
    registered pruner at every budget."""
    rows = efficiency_strategies(budgets, baseline_tokens)
    covered = {row.pruner for row in rows}
    others = [name for name in list_pruners() if name not in covered]
    for budget in budgets:
        rows += [Strategy(name, budget) for name in others]
    return rows


def smoke_config(clip_vocab_size: int) -> LVLMConfig:
    """The tiny preset with 32 LLM layers (the in-LLM methods' layer lists reach 24) and a 256-px
    SAM input; the LLM vocabulary holds the efficiency table's placeholder [SEG] id."""
    tiny = LVLMConfig.from_name("tiny-glamm")
    return replace(
        tiny,
        name="gpu-check-smoke",
        llm=replace(tiny.llm, num_layers=32, vocab_size=LVLMConfig.from_name("glamm-7b").llm.vocab_size),
        text=replace(tiny.text, vocab_size=clip_vocab_size),
        sam=replace(tiny.sam, image_size=256),
    )


def tensor_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def timed_forward(model, batch, pruner, device: torch.device) -> tuple[dict, object, int | None]:
    """One forward under a stage timer with a span around all of it: (timings, output, peak
    activation bytes; None off CUDA)."""
    resident = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    timer = StageTimer(device)
    with observing(model, timer), torch.no_grad(), timer(END_TO_END):
        output = model(batch, pruner)
    timings = timer.finish()
    peak = None if resident is None else timings["peak_memory_bytes"][END_TO_END] - resident
    return timings, output, peak


def measure(model, batch, strategy: Strategy, device, warmup: int, repeats: int, deadline: float) -> dict:
    """One row: medians of the timed forwards, peak activation memory, visual tokens per layer."""
    pruner = strategy.build().to(device)
    runs, peaks, output = [], [], None
    for index in range(warmup + repeats):
        if time.monotonic() > deadline:
            break
        timings, output, peak = timed_forward(model, batch, pruner, device)
        if index >= warmup:
            runs.append(timings["time_ms"])
            peaks.append(peak)
    if not runs:
        return {"status": "skipped", "error": "time limit reached before a timed forward"}
    stages = list(runs[0])
    return {
        "status": "ok",
        "error": None,
        "acts_in_llm": getattr(pruner, "acts_in_llm", None),
        "repetitions": len(runs),
        "prefill_ms": statistics.median(run["llm_prefill"] for run in runs),
        "end_to_end_ms": statistics.median(run[END_TO_END] for run in runs),
        "stage_ms": {stage: statistics.median(run.get(stage, 0.0) for run in runs) for stage in stages},
        "peak_activation_bytes": None if peaks[0] is None else max(peaks),
        "kept_visual_tokens": output.num_visual_tokens,
        "mean_visual_tokens_per_layer": statistics.fmean(output.visual_tokens_per_layer),
        "visual_tokens_per_layer": list(output.visual_tokens_per_layer),
        "sequence_length_per_layer": list(output.sequence_length_per_layer),
    }


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def format_table(report: dict) -> str:
    """One line per row: the columns docs/efficiency.md explains; error and skipped rows say why."""
    header = (
        f"{'method':<22}{'tokens':>7}{'kept':>6}{'mean':>7}{'prefill ms':>12}{'end-to-end ms':>15}"
        f"{'peak act MiB':>14}{'reps':>6}  status"
    )
    lines = [header, "-" * len(header)]
    for row in report["rows"]:
        if row["status"] != "ok":
            lines.append(f"{row['label']:<22}{row['num_tokens']:>7}{'':>66}  {row['status']}: {row['error']}"[:240])
            continue
        peak = "" if row["peak_activation_bytes"] is None else f"{row['peak_activation_bytes'] / 2**20:.0f}"
        lines.append(
            f"{row['label']:<22}{row['num_tokens']:>7}{row['kept_visual_tokens']:>6}"
            f"{row['mean_visual_tokens_per_layer']:>7.1f}{row['prefill_ms']:>12.2f}"
            f"{row['end_to_end_ms']:>15.2f}{peak:>14}{row['repetitions']:>6}  ok"
        )
    return "\n".join(lines)


def write(report: dict, path: Path, started: float) -> None:
    """Write atomically: a run killed mid-write leaves the previous complete table."""
    report["elapsed_s"] = round(time.monotonic() - started, 1)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(report, indent=2) + "\n")
    temporary.replace(path)


def default_out(smoke: bool) -> Path:
    name = "gpu_check_smoke.json" if smoke else "gpu_check.json"
    return Path(os.environ["OUT"]) / name if os.environ.get("OUT") else REPO / "runs" / name


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU, wall-clock timing, no CUDA call")
    parser.add_argument("--out", type=Path, help="JSON path (default $OUT/gpu_check.json if OUT is set, else runs/)")
    parser.add_argument("--budgets", type=int, nargs="+", default=list(BUDGETS), help="kept tokens (default 192 64)")
    parser.add_argument("--dtype", choices=list(DTYPES), help="weights and inputs (default bfloat16; smoke float32)")
    parser.add_argument("--warmup", type=int, help="untimed forwards per row (default 2; smoke 0)")
    parser.add_argument("--repeats", type=int, help="timed forwards per row, median reported (default 7; smoke 1)")
    parser.add_argument(
        "--time-limit", type=float, default=300.0, help="seconds (build included) after which no forward starts"
    )
    args = parser.parse_args(argv)
    args.warmup = (0 if args.smoke else 2) if args.warmup is None else args.warmup
    args.repeats = (1 if args.smoke else 7) if args.repeats is None else args.repeats
    if args.warmup < 0 or args.repeats < 1 or args.time_limit <= 0:
        parser.error("--warmup must be >= 0, --repeats >= 1 and --time-limit > 0")
    if not args.smoke and not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (the 7B model in bfloat16); use --smoke for the CPU check")
    return args


def skipped_row(strategy: Strategy, reason: str) -> dict:
    return {**row_key(strategy), "status": "skipped", "error": reason}


def row_key(strategy: Strategy) -> dict:
    return {"method": strategy.pruner, "mode": strategy.mode, "label": strategy.label,
            "num_tokens": strategy.num_tokens}


def measure_or_error(model, batch, strategy: Strategy, device, args, deadline: float) -> dict:
    """`measure`, or an error row: one method's failure (out of memory too) is its row's, not the table's."""
    try:
        return {**row_key(strategy), **measure(model, batch, strategy, device, args.warmup, args.repeats, deadline)}
    except Exception as err:
        message = (str(err).strip().splitlines() or [""])[0]
        return {**row_key(strategy), "status": "error", "error": f"{type(err).__name__}: {message}"[:300],
                "traceback": traceback.format_exc(limit=-6)}
    finally:
        release(device)


def run_table(args, started: float) -> dict:
    """Build the model on the device, measure every row until the time limit, write the JSON after each."""
    table = efficiency_table_module()
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = resolve_dtype(args.dtype or ("float32" if args.smoke else "bfloat16"))
    sample = table.default_sample(table.DEFAULT_TEXT_TOKENS, None, None)
    config = smoke_config(len(sample.clip_tokenizer)) if args.smoke else LVLMConfig.from_name("glamm-7b")
    out = args.out or default_out(args.smoke)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = table.build_model(config, sample, str(device), dtype)  # weights created on the device, in `dtype`
    batch = table.sample_batch(config, sample, str(device), dtype)
    strategies = registry_strategies(args.budgets, config.num_patches)
    report = {
        "model": config.name,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})",
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "smoke": args.smoke,
        "text_tokens": sample.text_tokens,
        "num_patches": config.num_patches,
        "weights_bytes": tensor_bytes(model),
        "build_s": round(time.monotonic() - started, 1),
        "warmup": args.warmup,
        "repeats": args.repeats,
        "time_limit_s": args.time_limit,
        "stopped_early": False,
        "registered_pruners": list_pruners(),
        "rows": [],
    }
    deadline = started + args.time_limit
    print(f"{config.name} on {report['device']}, {report['dtype']}, built in {report['build_s']} s; "
          f"{len(strategies)} rows, {args.warmup} warm-up + {args.repeats} timed forwards each", flush=True)
    try:
        for strategy in strategies:
            if time.monotonic() > deadline:
                report["stopped_early"] = True
                row = skipped_row(strategy, "time limit reached")
            else:
                row = measure_or_error(model, batch, strategy, device, args, deadline)
            report["rows"].append(row)
            write(report, out, started)
            print(format_table({"rows": [row]}).splitlines()[-1], flush=True)
    except KeyboardInterrupt:  # the run tool's timeout (SIGTERM) or Ctrl-C: keep what was measured
        report["stopped_early"] = True
        report["rows"] += [skipped_row(strategy, "interrupted") for strategy in strategies[len(report["rows"]) :]]
        print("interrupted: writing the rows measured so far", flush=True)
    write(report, out, started)
    print(f"\n{format_table(report)}\n\n{sum(row['status'] == 'ok' for row in report['rows'])} of "
          f"{len(strategies)} rows measured in {report['elapsed_s']} s; written to {out}")
    return report


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    args = parse_args(argv)
    threads = torch.get_num_threads()
    previous_handler = signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops measuring
    if args.smoke:
        torch.set_num_threads(1)  # tiny matrices: more threads only contend on a shared CI machine
    try:
        run_table(args, started)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        torch.set_num_threads(threads)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except LitelvlmError as err:
        sys.exit(f"error: {err}")
