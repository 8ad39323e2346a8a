"""Peak memory per rank of an evaluation on 1 and on N processes, and the images each rank decodes.

    python experiments/rank_memory.py                      # the demo, 1 and 2 CPU processes
    python experiments/rank_memory.py --processes 1 2 4 -- --config configs/sweep_demo.yaml

Each run is the CLI's `validate` (configs/demo.yaml unless other arguments follow `--`) with a
callback that, at the end, writes per rank its peak resident memory (`ru_maxrss`), the images it
decoded and the samples it scored. Under DDP each rank should decode exactly what it scores and
hold about the memory of one process (the model is replicated, the data is not). The numbers in
docs/scaling.md come from this script.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CALLBACK = """
import json, os, resource
import lightning as L
import litelvlm.data.refcoco_original as original
import litelvlm.data.refcoco_parquet as parquet

decoded = []
for module in (parquet, original):
    module.decode_rgb = (lambda decode: lambda file: decoded.append(1) or decode(file))(module.decode_rgb)


class RankMemory(L.Callback):
    def __init__(self):
        self.scored = 0

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.scored += len(getattr(batch, "sample_ids", []))

    def on_validation_end(self, trainer, pl_module):
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        record = {"rank": trainer.global_rank, "world_size": trainer.world_size, "peak_rss_mib": round(peak_mib, 1),
                  "decoded_images": len(decoded), "scored_samples": self.scored}
        with open(os.path.join(os.environ["RANK_MEMORY_OUT"], f"rank{trainer.global_rank}.json"), "w") as handle:
            json.dump(record, handle)
"""


def measure(processes: int, cli_args: list[str], work: Path) -> list[dict]:
    out = work / f"p{processes}"
    out.mkdir()
    (work / "rank_memory_callback.py").write_text(CALLBACK)
    env = {**os.environ, "RANK_MEMORY_OUT": str(out)}
    env["PYTHONPATH"] = os.pathsep.join([str(work), str(REPO), env.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "litelvlm.cli", "validate", *cli_args, "--trainer.accelerator", "cpu"]
    command += ["--trainer.devices", str(processes), "--trainer.enable_progress_bar", "false"]
    command += ["--trainer.strategy", "ddp"] if processes > 1 else []
    command += ["--trainer.callbacks+=rank_memory_callback.RankMemory", "--trainer.logger.init_args.save_dir", str(out)]
    subprocess.run(command, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(processes)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("cli_args", nargs="*", help="after --: the CLI's arguments (default: --config configs/demo.yaml)")
    args = parser.parse_args()
    cli_args = args.cli_args or ["--config", "configs/demo.yaml"]
    print(f"{'processes':>9} {'rank':>4} {'peak RSS MiB':>13} {'images decoded':>15} {'samples scored':>15}")
    with tempfile.TemporaryDirectory() as work:
        for processes in args.processes:
            for row in measure(processes, cli_args, Path(work)):
                print(f"{processes:>9} {row['rank']:>4} {row['peak_rss_mib']:>13.1f} {row['decoded_images']:>15} {row['scored_samples']:>15}")


if __name__ == "__main__":
    main()
