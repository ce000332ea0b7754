"""Does the evolutionary search find better archs than as many uniform samples?

    python bench/search_vs_random.py --name t-1724 --flops 5.28G --seeds 0,1,2

On a trained run, for each seed: the evolutionary search (`search.evolve`, population 16,
4 generations, as `nas.py all` runs it) and as many uniform samples inside the same budget;
the best supernet top-1 each found, and evaluated archs per minute. Both score archs with the
same `search.Fitness` (and so share its cache: an arch both draw is evaluated once). Writes
bench/results/search-vs-random-<preset>.json and prints the table.
"""

import json
import random
import sys
import time
from datetime import date
from pathlib import Path

import typer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import evaluate  # noqa: E402
import search  # noqa: E402
import supernet  # noqa: E402
import presets  # noqa: E402
import trainer  # noqa: E402
from data import load_data  # noqa: E402


def main(name: str = typer.Option(..., help="a trained run in runs/"),
         flops: str = typer.Option("5.28G", help="FLOPs budget, challenge units"),
         seeds: str = "0,1,2", population: int = 16, generations: int = 4,
         device: str = "cpu"):
    run_dir = ROOT / "runs" / name
    config = json.loads((run_dir / "config.json").read_text())
    st = trainer.state_from_config(config, device)
    trainer.load_checkpoint(st, trainer.last_checkpoint(run_dir))
    presets.set_threads(st.preset)
    data = load_data(st.preset, device)
    budget = search.Budget(flops=search.parse_amount(flops, "--flops"))
    log = search.SearchLog(run_dir / "search-vs-random.jsonl", "bench", "bench")
    fitness = search.Fitness(st, data, log)
    admits = lambda a: fitness.admits(a, budget)  # noqa: E731
    rows = []
    for seed in [int(s) for s in seeds.split(",")]:
        t = time.perf_counter()
        evolved = search.evolve(fitness, admits, population, generations, seed)
        seconds = time.perf_counter() - t
        uniform = search.sample_within(random.Random(10_000 + seed), len(evolved), admits)
        drawn = fitness(uniform)
        rows.append({"seed": seed, "evaluated": len(evolved),
                     "search_best": max(evolved.values()), "uniform_best": max(drawn.values()),
                     "search_archs_per_min": 60 * len(evolved) / seconds})
        r = rows[-1]
        typer.echo(f"seed {seed}: {r['evaluated']} archs; best top-1 search "
                   f"{r['search_best']:.4f}, uniform {r['uniform_best']:.4f}")
    out = ROOT / "bench" / "results" / f"search-vs-random-{st.preset.name}.json"
    presets.write_json_atomic(out, {"date": date.today().isoformat(), "run": name,
                                     "budget": budget.describe(), "device": device,
                                     "machine": evaluate.machine_name(device), "rows": rows})
    typer.echo(f"wrote {out}")


if __name__ == "__main__":
    typer.run(main)
