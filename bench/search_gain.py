"""Does the supernet's search pick better archs than chance, by the stand-alone ground truth?

    python bench/search_gain.py --name RUN [--top 4] [--uniform 4]

On a run that `nas.py all` finished: the `top` best archs of its search (search.jsonl, the
run's last weights) under the budget `all` searches under (half the largest arch's FLOPs,
`search.default_budget`), and `uniform` archs drawn uniformly within the same budget (seeded,
none of the top ones). Each is trained stand-alone with the run's preset's recipe x 2 seeds
and written as it finishes into `--store`, by default the committed
bench/results/groundtruth.json, so a killed run, or the next session, goes on where it stopped
(nets found only in the run's groundtruth.json are copied there). Reports the preset's reading
(`Preset.gt_reading`), and top-1, per group and the difference of the group means, searched
minus uniform, with a 95% bootstrap interval that resamples the archs of each group; and, seed
by seed, the same difference (both groups' nets of one seed see the same images in the same
order: our reading of "paired").
Writes bench/results/search-gain-<preset>.json and prints the table.
"""

import json
import random
import statistics
import sys
from datetime import date
from pathlib import Path

import numpy as np
import scipy.stats
import typer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import ablation  # noqa: E402
import evaluate  # noqa: E402
import events  # noqa: E402
import groundtruth  # noqa: E402
import presets  # noqa: E402
import report  # noqa: E402
import search  # noqa: E402
import supernet  # noqa: E402
import trainer  # noqa: E402
from data import DataError, load_data  # noqa: E402


def best_searched(log: search.SearchLog, admits, top: int, shape) -> list[supernet.Arch]:
    """The `top` archs of highest supernet top-1 in the search log that `admits` accepts, one
    per net: codes that build the same net at `shape` (`supernet.physical_net`) count once."""
    inside = [(t, c) for c, t in log.top1.items() if admits(supernet.decode(c))]
    best: dict[tuple, supernet.Arch] = {}
    for _, c in sorted(inside, reverse=True):
        arch = supernet.decode(c)
        best.setdefault(supernet.physical_net(arch, shape), arch)
        if len(best) == top:
            break
    return list(best.values())


def group_difference(searched: list[float], uniform: list[float], seed: int = 0) -> dict:
    """Mean of `searched` minus mean of `uniform`, with a 95% bootstrap interval (each group's
    values resampled apart) and Welch's t-test p-value. With 4 values a group the percentile
    interval is too narrow (a resample of 4 varies less than the population does); the t-test
    accounts for the small groups, so both are reported."""
    diff = lambda a, b: np.mean(a) - np.mean(b)  # noqa: E731
    boot = scipy.stats.bootstrap((np.asarray(searched), np.asarray(uniform)), diff,
                                 vectorized=False, n_resamples=report.N_BOOT,
                                 method="percentile", **report.bootstrap_seed(seed))
    bounds = np.percentile(boot.bootstrap_distribution, [2.5, 97.5])
    welch = scipy.stats.ttest_ind(searched, uniform, equal_var=False)
    return {"difference": float(diff(searched, uniform)), "ci": [float(v) for v in bounds],
            "welch_p": float(welch.pvalue)}


def main(name: str = typer.Option(..., help="a run that `nas.py all` finished, in --runs"),
         top: int = typer.Option(4, min=2), uniform: int = typer.Option(4, min=2),
         seed: int = 0, device: str = "cpu", data_dir: Path = typer.Option(None),
         runs: Path = typer.Option(ROOT / "runs"),
         store: Path = typer.Option(groundtruth.SHARED_GROUND_TRUTH,
                                    help="the ground-truth file each net is written into"),
         out: Path = typer.Option(ROOT / "bench" / "results")):
    run_dir = runs / name
    if not (run_dir / "config.json").exists() or not (run_dir / "search.jsonl").exists():
        raise typer.BadParameter(f"{run_dir} holds no finished run with a search "
                                 "(config.json and search.jsonl); run `nas.py all` first")
    config = json.loads((run_dir / "config.json").read_text())
    try:
        device = presets.pick_device(device)
        st = trainer.state_from_config(config, device)
        trainer.load_checkpoint(st, trainer.last_checkpoint(run_dir))
        presets.set_threads(st.preset)
        data = load_data(st.preset, device, data_dir)
    except (ValueError, DataError, presets.TrainingError) as e:
        raise typer.BadParameter(str(e))
    p, budget = st.preset, search.default_budget()
    log = search.SearchLog(run_dir / "search.jsonl", search.weights_key(st, data.device),
                           evaluate.machine_name(data.device))
    fitness = search.Fitness(st, data, log)
    admits = lambda a: fitness.admits(a, budget)  # noqa: E731
    searched = best_searched(log, admits, top, p.shape)
    if len(searched) < top:
        raise typer.BadParameter(f"the search of {name} holds {len(searched)} distinct nets "
                                 f"under {budget.describe()} with its last weights, fewer "
                                 f"than {top}")
    taken = {supernet.physical_net(a, p.shape) for a in searched}  # none of them, nor aliases
    drawn = search.sample_within(
        random.Random(seed), uniform,
        lambda a: admits(a) and supernet.physical_net(a, p.shape) not in taken)
    # The store is what survives the session (committed); the run's own file, read-only here,
    # may hold nets an earlier version of this script wrote there.
    gt = groundtruth.GroundTruth(store, run_dir / "groundtruth.json")
    echo = ablation.echo(events.EventLog(run_dir / "search-gain-events.jsonl"))
    groundtruth.ground_truth(gt, searched + drawn, 2, p, data, echo)
    recipe = groundtruth.recipe_key(p, data.device)

    groups = (("searched", searched), ("uniform", drawn))

    def readings(archs, s, reading):
        return [gt.get(supernet.encode(a), p.dataset, recipe, s, reading) for a in archs]
    per_seed = {g: [readings(archs, s, p.gt_reading) for s in (0, 1)] for g, archs in groups}
    means = {g: [statistics.mean(v) for v in zip(*per_seed[g])] for g in per_seed}
    # Top-1 besides the preset's reading: what a user of the exported net sees.
    top1 = {g: [statistics.mean(v) for v in zip(*(readings(archs, s, "acc") for s in (0, 1)))]
            for g, archs in groups}
    result = {"date": date.today().isoformat(), "run": name, "preset": p.name,
              "reading": report.READINGS[p.gt_reading][0], "recipe": recipe,
              "budget": budget.describe(), "device": evaluate.machine_name(data.device),
              "archs": {g: [supernet.encode(a) for a in archs] for g, archs in groups},
              "supernet_top1": {g: [log.top1.get(supernet.encode(a)) for a in archs]
                                for g, archs in groups},
              "per_seed": per_seed, "means": means,
              "difference": group_difference(means["searched"], means["uniform"], seed),
              "top1_means": top1,
              "top1_difference": group_difference(top1["searched"], top1["uniform"], seed),
              "per_seed_difference": [statistics.mean(per_seed["searched"][s])
                                      - statistics.mean(per_seed["uniform"][s]) for s in (0, 1)]}
    out.mkdir(parents=True, exist_ok=True)
    presets.write_json_atomic(out / f"search-gain-{p.name}.json", result)
    d, t = result["difference"], result["top1_difference"]
    typer.echo(f"{result['reading']} of the stand-alone nets ({budget.describe()}, 2 seeds):\n"
               f"  searched ({top}): {statistics.mean(means['searched']):.4f}\n"
               f"  uniform  ({len(drawn)}): {statistics.mean(means['uniform']):.4f}\n"
               f"  searched minus uniform: {d['difference']:+.4f} "
               f"[{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}], Welch p {d['welch_p']:.3f}; seed 0 "
               f"{result['per_seed_difference'][0]:+.4f}, seed 1 "
               f"{result['per_seed_difference'][1]:+.4f}\n"
               f"top-1: searched {statistics.mean(top1['searched']):.4f}, uniform "
               f"{statistics.mean(top1['uniform']):.4f}, searched minus uniform "
               f"{t['difference']:+.4f} [{t['ci'][0]:+.4f}, {t['ci'][1]:+.4f}], "
               f"Welch p {t['welch_p']:.3f}")
    typer.echo(f"wrote {out / f'search-gain-{p.name}.json'}")


if __name__ == "__main__":
    typer.run(main)
