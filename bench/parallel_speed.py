"""One process against torchrun's several, on this machine's CPU cores.

    python bench/parallel_speed.py [--preset tiny] [--ranks 2]

Times two commands of nas.py, each run twice from nothing: once as one process with all the
cores' threads (torch's default), once under `torchrun --standalone --nproc_per_node=RANKS`
with one thread per process (torchrun's default):
- `train --preset PRESET`: data-parallel supernet training (each rank half of every batch);
- `groundtruth --preset PRESET --archs-n N --seeds 1`: stand-alone nets split by arch. Its
  archs are drawn with their own seed, so no committed ground truth stands in for training.
The runs go to runs/bench-par-*, removed first. Writes bench/results/parallel-<preset>-cpu.json.
"""

import os
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch
import typer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import evaluate  # noqa: E402
import presets  # noqa: E402

GT_ARCH_SEED = 4242  # archs no committed ground truth holds


def timed(command: list[str], ranks: int) -> float:
    head = [sys.executable]
    env = dict(os.environ)
    if ranks > 1:
        head += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
        env["OMP_NUM_THREADS"] = "1"
    t = time.perf_counter()
    done = subprocess.run([*head, "nas.py", *command, "--quiet"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return seconds


def main(preset: str = typer.Option("tiny", help="preset of both commands"),
         ranks: int = typer.Option(2, min=2, help="processes under torchrun"),
         archs_n: int = typer.Option(8, "--archs-n", help="ground-truth archs")):
    rows = []
    for what, args in (("train", ["train", "--preset", preset, "--device", "cpu"]),
                       ("groundtruth", ["groundtruth", "--preset", preset, "--device", "cpu",
                                        "--archs-n", str(archs_n), "--seeds", "1",
                                        "--seed", str(GT_ARCH_SEED)])):
        row = {"command": what}
        for n in (1, ranks):
            name = f"bench-par-{what}-{n}"
            shutil.rmtree(ROOT / "runs" / name, ignore_errors=True)
            row[f"seconds_{n}"] = timed([*args, "--name", name], n)
            print(f"{what:12} {n} process(es): {row[f'seconds_{n}']:.1f} s", flush=True)
        row["speedup"] = row["seconds_1"] / row[f"seconds_{ranks}"]
        rows.append(row)
    print(f"\n| command | 1 process, {torch.get_num_threads()} threads | torchrun, {ranks} x 1 "
          "thread | speed-up |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['command']} | {r['seconds_1']:.1f} s | {r[f'seconds_{ranks}']:.1f} s "
              f"| {r['speedup']:.2f} |")
    out = ROOT / "bench" / "results" / f"parallel-{preset}-cpu.json"
    presets.write_json_atomic(out, {"date": str(date.today()), "preset": preset, "ranks": ranks,
                                     "threads_alone": torch.get_num_threads(),
                                     "machine": evaluate.machine_name("cpu"), "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    typer.run(main)
