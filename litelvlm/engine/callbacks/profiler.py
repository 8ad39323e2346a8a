"""What pruning saves, measured on the run itself: FLOPs, time and memory per stage, KV-cache bytes.

The model wraps each stage of its forward in `lvlm.stage(name)`; this module provides the observers
that plug into it (`StageFlopCounter`, `StageTimer`) and the `EfficiencyProfiler` callback that
installs them for a validate/test run. Without the callback the model's stage contexts are no-ops.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from statistics import fmean
from typing import TypeVar

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from litelvlm.errors import LitelvlmError

T = TypeVar("T")

# The stages of PixelGroundingLVLM's forward, in order; together they make up the whole forward.
STAGES = ("clip_vision", "clip_text", "pruner_select", "llm_prefill", "sam_image_encoder", "sam_decoder")
# Stages reported on their own but also counted inside another (not added to totals).
NESTED_STAGES = {"llm_decoder": "llm_prefill"}
MIB = 2**20


def kv_cache_bytes(
    sequence_length_per_layer: Sequence[int], num_kv_heads: int, head_dim: int, dtype: torch.dtype, batch_size: int = 1
) -> int:
    """Bytes of keys and values the LLM stores for the sequence it actually ran.

    2 (K and V) x sum over layers of (that layer's sequence length) x kv heads x head dim x bytes
    per element, per sample: a layer that FastV shortened stores only its shortened sequence.
    """
    element_bytes = torch.empty((), dtype=dtype).element_size()
    return 2 * sum(sequence_length_per_layer) * num_kv_heads * head_dim * element_bytes * batch_size


def llm_kv_geometry(lvlm) -> tuple[int, int, torch.dtype]:
    """(kv heads, head dim, dtype) of the model's LLM, for `kv_cache_bytes`."""
    llm = lvlm.config.llm
    return llm.num_kv_heads or llm.num_heads, llm.hidden_size // llm.num_heads, lvlm.llm.dtype


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def flop_counter() -> FlopCounterMode:
    """`FlopCounterMode` that also counts SDPA's CPU kernel, which torch's formula registry omits
    (its CUDA kernels and the math fallback on meta are counted already). Attention is charged in
    full (scores and weighted sum over every query-key pair), whatever the mask, as torch does."""
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return FlopCounterMode(display=False, custom_mapping={cpu_sdpa: _sdpa_flops} if cpu_sdpa is not None else None)


class StageFlopCounter:
    """Stage observer: FLOPs of each stage, counted op by op with `FlopCounterMode`.

    A FLOP is a multiply or an add, so a matrix product counts 2 x its multiply-accumulates.
    A nested stage (llm_decoder) is counted both on its own and inside its enclosing stage.
    """

    def __init__(self) -> None:
        self.flops: dict[str, int] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str):
        with flop_counter() as counter:
            yield
        self.flops[stage] = self.flops.get(stage, 0) + counter.get_total_flops()

    @property
    def total(self) -> int:
        return sum(count for stage, count in self.flops.items() if stage not in NESTED_STAGES)


@contextlib.contextmanager
def observing(lvlm, observer):
    """Install `observer` as the model's stage observer for the duration, then restore the old one."""
    previous = lvlm.stage_observer
    lvlm.stage_observer = observer
    try:
        yield observer
    finally:
        lvlm.stage_observer = previous


def count_stage_flops(lvlm, run: Callable[[], T]) -> tuple[T, dict[str, int]]:
    """Run `run()` (a forward of `lvlm`) and return its result and the FLOPs of every stage it ran."""
    with observing(lvlm, StageFlopCounter()) as counter, torch.no_grad():
        result = run()
    return result, dict(counter.flops)


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so that a host clock brackets the work itself."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


class StageTimer:
    """Stage observer: wall time and GPU peak memory of every stage it sees, in order.

    On CUDA, events recorded on the stream (read after one synchronisation at `finish`) and the
    allocator's peak, reset at every stage boundary; elsewhere `time.perf_counter` around
    synchronised regions, and no memory figure.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._spans: list[dict] = []  # per stage occurrence: stage, start and end marks, peak bytes
        self._open: list[dict] = []

    def _mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        synchronize(self.device)
        return time.perf_counter()

    def _memory_boundary(self) -> None:
        """Charge the peak since the last boundary to every open stage, then start a new window."""
        if not self.cuda:
            return
        peak = torch.cuda.max_memory_allocated(self.device)
        for span in self._open:
            span["peak"] = max(span["peak"] or 0, peak)
        torch.cuda.reset_peak_memory_stats(self.device)

    @contextlib.contextmanager
    def __call__(self, stage: str):
        self._memory_boundary()
        span = {"stage": stage, "start": self._mark(), "end": None, "peak": None}
        self._open.append(span)
        self._spans.append(span)
        try:
            yield
        finally:
            span["end"] = self._mark()
            self._memory_boundary()
            self._open.remove(span)

    def finish(self) -> dict:
        """`spans`: every stage occurrence in order (stage, ms, peak bytes or None); and over all of
        them: ms per stage (summed), end to end (first start to last end), peak bytes per stage."""
        if not self._spans:
            return {"spans": [], "time_ms": {}, "end_to_end_ms": None, "peak_memory_bytes": None}
        if self.cuda:
            torch.cuda.synchronize(self.device)
        elapsed = (lambda a, b: a.elapsed_time(b)) if self.cuda else (lambda a, b: 1000.0 * (b - a))
        spans = [
            {"stage": span["stage"], "ms": elapsed(span["start"], span["end"]), "peak_memory_bytes": span["peak"]}
            for span in self._spans
        ]
        time_ms: dict[str, float] = {}
        peaks: dict[str, int] = {}
        for span in spans:
            time_ms[span["stage"]] = time_ms.get(span["stage"], 0.0) + span["ms"]
            if span["peak_memory_bytes"] is not None:
                peaks[span["stage"]] = max(peaks.get(span["stage"], 0), span["peak_memory_bytes"])
        return {
            "spans": spans,
            "time_ms": time_ms,
            "end_to_end_ms": elapsed(self._spans[0]["start"], self._spans[-1]["end"]),
            "peak_memory_bytes": peaks if self.cuda else None,
        }


def charge_spans(spans: list[dict], num_configurations: int) -> list[dict]:
    """Split one step's stage timings among the configurations it evaluated.

    A stage that occurred once per configuration belongs to them in order (the k-th occurrence to
    the k-th configuration: a sweep's select, LLM and mask decoding); any other stage ran for all
    of them (a sweep's shared encoders) and is charged to each in full. Per configuration: ms and
    peak bytes per stage, and end to end = the sum of its top-level stages (they cover the forward).
    """
    occurrences: dict[str, list[dict]] = {}
    for span in spans:
        occurrences.setdefault(span["stage"], []).append(span)
    charged = []
    for index in range(num_configurations):
        time_ms, peaks = {}, {}
        for stage, found in occurrences.items():
            own = [found[index]] if len(found) == num_configurations else found
            time_ms[stage] = sum(span["ms"] for span in own)
            stage_peaks = [span["peak_memory_bytes"] for span in own if span["peak_memory_bytes"] is not None]
            if stage_peaks:
                peaks[stage] = max(stage_peaks)
        end_to_end = sum(ms for stage, ms in time_ms.items() if stage not in NESTED_STAGES)
        charged.append({"time_ms": time_ms, "end_to_end_ms": end_to_end, "peak_memory_bytes": peaks or None})
    return charged


def evaluated_configurations(pl_module: L.LightningModule) -> list[tuple[str, object]]:
    """(name, pruner) of every configuration the module evaluates: a sweep's, or its one pruner."""
    names, pruners = getattr(pl_module, "configuration_names", None), getattr(pl_module, "pruners", None)
    if names is not None and pruners is not None:
        return list(zip(names, pruners))
    pruner = getattr(pl_module, "pruner", None)
    if pruner is None:
        raise LitelvlmError(f"EfficiencyProfiler: {type(pl_module).__name__} has no `pruner` or `pruners`")
    return [(pruner.name if pruner.num_tokens is None else f"{pruner.name}@{pruner.num_tokens}", pruner)]


def outputs_by_configuration(outputs, names: list[str]) -> dict:
    """The GroundingOutput of each configuration from a step's return value (EvaluatedBatch or a GroundingOutput)."""
    by_name = getattr(outputs, "outputs", None)
    return dict(by_name) if by_name is not None else {names[0]: outputs}


class EfficiencyProfiler(L.Callback):
    """Per batch and configuration, and per run: FLOPs, time and peak memory by stage, KV-cache
    bytes, visual tokens and sequence length per layer.

    Each batch runs once as the trainer runs it, timed (the first `warmup_batches` batches are
    recorded but left out of the time and memory means). FLOPs are counted afterwards in a forward
    of each configuration alone under `FlopCounterMode` (`count_flops`), so the counter's per-op
    overhead never enters a timing; this adds one forward per configuration to every batch.
    Neither pass changes the model's outputs. Means go to the loggers as `efficiency/...`
    (`efficiency/<configuration>/...` in a sweep), and every record with the means to
    `efficiency.json` beside the logs. In a sweep the shared encoders (CLIP vision with every
    signal any configuration needs, CLIP text, SAM image encoder) are timed once and charged to
    every configuration; FLOPs are each configuration's own.

    Records are per batch; with batch_size 1 (configs/profile_demo.yaml) they are per sample.

    Args:
        warmup_batches: leading batches whose time and memory are not averaged.
        count_flops: count FLOPs with a counted forward of every configuration on every batch.
        filename: the JSON summary's name in the run folder.
    """

    def __init__(self, warmup_batches: int = 1, count_flops: bool = True, filename: str = "efficiency.json") -> None:
        if not isinstance(warmup_batches, int) or isinstance(warmup_batches, bool) or warmup_batches < 0:
            raise LitelvlmError(f"warmup_batches must be an integer >= 0, got {warmup_batches!r}")
        self.warmup_batches = warmup_batches
        self.count_flops = count_flops
        self.filename = filename
        self.records: list[dict] = []
        self.summary: dict | None = None
        self._timer: StageTimer | None = None
        self._batches_seen = 0

    # ------------------------------------------------------------------ install / remove
    @staticmethod
    def _lvlm(pl_module: L.LightningModule):
        lvlm = getattr(pl_module, "lvlm", None)
        if lvlm is None or not hasattr(lvlm, "stage_observer"):
            raise LitelvlmError(
                "EfficiencyProfiler needs a LightningModule with an `lvlm` (PixelGroundingLVLM) attribute, "
                f"such as ReferringSegmentationModule; got {type(pl_module).__name__}"
            )
        return lvlm

    def _start(self, pl_module: L.LightningModule) -> None:
        self._lvlm(pl_module)
        if getattr(pl_module, "encoders_only", False):
            raise LitelvlmError("EfficiencyProfiler measures the grounding forward, which model.encoders_only skips")
        self.records, self.summary, self._batches_seen = [], None, 0

    def _stop(self, pl_module: L.LightningModule) -> None:
        self._lvlm(pl_module).stage_observer = None
        self._timer = None

    def on_validation_start(self, trainer, pl_module) -> None:
        self._start(pl_module)

    def on_test_start(self, trainer, pl_module) -> None:
        self._start(pl_module)

    # ------------------------------------------------------------------ per batch
    def _batch_start(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        self._timer = StageTimer(pl_module.device)
        self._lvlm(pl_module).stage_observer = self._timer

    def _batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int) -> None:
        lvlm = self._lvlm(pl_module)
        lvlm.stage_observer = None
        timer, self._timer = self._timer, None
        if trainer.sanity_checking or timer is None or outputs is None:  # None: nothing of this batch ran
            return
        configurations = evaluated_configurations(pl_module)
        names = [name for name, _ in configurations]
        by_name = outputs_by_configuration(outputs, names)
        charged = charge_spans(timer.finish()["spans"], len(configurations))
        kv_heads, head_dim, dtype = llm_kv_geometry(lvlm)
        warmup = self._batches_seen < self.warmup_batches
        self._batches_seen += 1
        for (name, pruner), timing in zip(configurations, charged):
            output = by_name[name]
            flops = None
            if self.count_flops:
                _, flops = count_stage_flops(lvlm, lambda: lvlm(batch, pruner))
            self.records.append(
                {
                    "configuration": name,
                    "split": getattr(outputs, "split", None),
                    "dataloader_idx": dataloader_idx,
                    "batch_idx": batch_idx,
                    "sample_ids": [int(i) for i in batch.sample_ids.tolist()],
                    "batch_size": batch.batch_size,
                    "warmup": warmup,
                    "flops": flops,
                    "total_flops": None if flops is None else sum(v for k, v in flops.items() if k not in NESTED_STAGES),
                    **timing,
                    "kv_cache_bytes": kv_cache_bytes(
                        output.sequence_length_per_layer, kv_heads, head_dim, dtype, batch.batch_size
                    ),
                    "visual_tokens": output.num_visual_tokens,
                    "visual_tokens_per_layer": list(output.visual_tokens_per_layer),
                    "sequence_length_per_layer": list(output.sequence_length_per_layer),
                }
            )

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._batch_start(trainer, pl_module)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._batch_start(trainer, pl_module)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)

    # ------------------------------------------------------------------ per run
    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._summarise(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._summarise(trainer, pl_module, "test")

    def _summarise(self, trainer, pl_module, stage: str) -> None:
        if trainer.sanity_checking:
            return
        configurations = evaluated_configurations(pl_module)
        order = {name: index for index, (name, _) in enumerate(configurations)}
        records = sorted(
            _gather_records(self.records),
            key=lambda r: (r["dataloader_idx"], r["sample_ids"][:1], order.get(r["configuration"], len(order))),
        )
        lvlm = self._lvlm(pl_module)
        self.summary = {
            "stage": stage,
            "model": lvlm.config.name,
            "device": str(pl_module.device),
            "dtype": str(lvlm.llm.dtype).removeprefix("torch."),
            "world_size": trainer.world_size,
            "warmup_batches": self.warmup_batches,
            "configurations": {
                name: {
                    **pruner.hparams(),
                    **summarise_records([r for r in records if r["configuration"] == name]),
                }
                for name, pruner in configurations
            },
            "records": records,
        }
        metrics = {}
        for name, summary in self.summary["configurations"].items():
            prefix = "efficiency" if len(configurations) == 1 else f"efficiency/{name}"
            metrics |= tensorboard_scalars(summary, prefix)
        for logger in trainer.loggers:  # loggers write on rank zero only
            logger.log_metrics(metrics, step=trainer.global_step)

    def on_validation_end(self, trainer, pl_module) -> None:
        self._write(trainer)
        self._stop(pl_module)

    def on_test_end(self, trainer, pl_module) -> None:
        self._write(trainer)
        self._stop(pl_module)

    def _write(self, trainer) -> None:
        # `trainer.log_dir` broadcasts under DDP: every rank must ask, only rank zero writes.
        folder = Path(trainer.log_dir or trainer.default_root_dir)
        self._write_on_rank_zero(folder)

    @rank_zero_only
    def _write_on_rank_zero(self, folder: Path) -> None:
        if self.summary is None:
            return
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / self.filename
        path.write_text(json.dumps(self.summary, indent=2) + "\n")
        print(f"efficiency written to {path}")


def _gather_records(records: list[dict]) -> list[dict]:
    """Every rank's records under DDP; the local ones otherwise."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, records)
        return [record for rank_records in gathered for record in rank_records]
    return list(records)


def summarise_records(records: list[dict]) -> dict:
    """Means of one configuration: FLOPs, KV bytes and tokens per sample over all its records; time
    and memory over the timed (non-warm-up) records only, per batch."""
    num_samples = sum(record["batch_size"] for record in records)
    timed = [record for record in records if not record["warmup"]]
    counted = [record for record in records if record["flops"] is not None]
    counted_samples = sum(record["batch_size"] for record in counted)
    all_stages = (*STAGES, *NESTED_STAGES)
    flops_per_sample = None
    if counted:
        flops_stages = [stage for stage in all_stages if any(stage in record["flops"] for record in counted)]
        flops_per_sample = {
            stage: sum(record["flops"].get(stage, 0) for record in counted) / counted_samples for stage in flops_stages
        }
        flops_per_sample["total"] = sum(record["total_flops"] for record in counted) / counted_samples
    time_ms_per_batch = None
    if timed:
        time_stages = [stage for stage in all_stages if any(stage in record["time_ms"] for record in timed)]
        time_ms_per_batch = {stage: fmean(record["time_ms"].get(stage, 0.0) for record in timed) for stage in time_stages}
        time_ms_per_batch["end_to_end"] = fmean(record["end_to_end_ms"] for record in timed)
    memory = [record["peak_memory_bytes"] for record in timed if record["peak_memory_bytes"]]
    layers = max((len(record["sequence_length_per_layer"]) for record in records), default=0)
    return {
        "num_batches": len(records),
        "num_samples": num_samples,
        "timed_batches": len(timed),
        "flops_per_sample": flops_per_sample,
        # multiply-accumulates of the LLM decoder (the llm_decoder stage): the published efficiency unit
        "llm_macs_per_sample": None if flops_per_sample is None else flops_per_sample.get("llm_decoder", 0) / 2,
        "time_ms_per_batch": time_ms_per_batch,
        "peak_memory_bytes": {
            stage: max(peaks.get(stage, 0) for peaks in memory) for stage in all_stages if any(stage in p for p in memory)
        } if memory else None,
        "kv_cache_bytes_per_sample": sum(record["kv_cache_bytes"] for record in records) / max(num_samples, 1),
        "visual_tokens": fmean(record["visual_tokens"] for record in records) if records else None,
        "sequence_length_per_layer": [
            fmean(record["sequence_length_per_layer"][layer] for record in records) for layer in range(layers)
        ],
    }


def tensorboard_scalars(summary: dict, prefix: str = "efficiency") -> dict[str, float]:
    """One configuration's means as flat `<prefix>/...` scalars, in readable units."""
    scalars = {
        f"{prefix}/kv_cache_mib": summary["kv_cache_bytes_per_sample"] / MIB,
        f"{prefix}/visual_tokens": summary["visual_tokens"],
    }
    if summary["flops_per_sample"] is not None:
        scalars[f"{prefix}/llm_tmacs"] = summary["llm_macs_per_sample"] / 1e12
        for stage, flops in summary["flops_per_sample"].items():
            scalars[f"{prefix}/gflops/{stage}"] = flops / 1e9
    for stage, ms in (summary["time_ms_per_batch"] or {}).items():
        scalars[f"{prefix}/time_ms/{stage}"] = ms
    for stage, peak in (summary["peak_memory_bytes"] or {}).items():
        scalars[f"{prefix}/peak_memory_mib/{stage}"] = peak / MIB
    return {name: float(value) for name, value in scalars.items() if value is not None}
