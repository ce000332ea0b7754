"""How much signal a stand-alone ground truth has, as a function of its training budget.

    python bench/gt_recipe.py --preset small --budgets 0.5,1,2 --archs 24
    python bench/gt_recipe.py --preset small --train-subset 0 --budgets 12 --archs 12 --spread

Trains the same archs with two seeds at each budget (epochs of the preset's training set, the
rest of the preset's recipe unchanged; `--train-subset`, `--label-smoothing`, `--image-size`
and `--width-mult` override those settings) and reports, per budget, in the preset's reading
(`Preset.gt_reading`): seed-vs-seed Pearson, Kendall and Spearman with 95% intervals; the
ceiling they imply for any predictor against the 2-seed mean (report.spearman_brown_ceiling);
Kendall tau of FLOPs against that mean (positive: the ground truth ranks capacity, not speed
of training); the spread of top-1; the seconds per net.
Each of these for every reading of the nets (report.READINGS): top-1 and held-out
cross-entropy of the EMA weights, each also with flip averaging; the headline reading
(`Preset.gt_reading`) is the one the seeds agree on most, chosen here on the recipe archs,
never on the headline ones.

The archs are sampled uniformly from the challenge space with their own seed (`--arch-seed`,
never the headline archs' seed 0), so a recipe is never chosen on the archs it is judged on.
`--spread` takes them across the FLOPs range instead (the 2 smallest, the 2 largest and the
rest evenly between, of 20 times as many uniform draws): a pilot of few nets then shows
whether the recipe ranks capacity. Its agreement is inflated by that spread, so each row
also projects the seed-vs-seed Kendall onto 40 uniform archs (`projected_kendall`).
Every net lands in the committed bench/results/groundtruth.json as it finishes (its recipe
hash keeps budgets apart): a killed run goes on where it stopped, and a rerun only reads.
`--so-far` trains nothing: it reports on the archs whose two seeds are both stored, so a ground
truth built across sessions (issue 21) shows at each session's end what it says so far.
Writes bench/results/gt-recipe-<preset>[-ls<x>][-sub<n>][-px<n>][-w<x>][-archseed<s>][-spread]
[-so-far].json and .md.
"""

import statistics
import sys
from dataclasses import replace
from datetime import date
from pathlib import Path

import numpy as np
import torch
import typer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import groundtruth  # noqa: E402
import presets  # noqa: E402
import report  # noqa: E402
import supernet  # noqa: E402
from data import DataError, load_data  # noqa: E402


PROJECTED_N = 40


def spread_archs(n: int, seed: int, preset) -> list[supernet.Arch]:
    """n archs across the FLOPs range of 20 n uniform draws: the 2 smallest, the 2 largest,
    and n - 4 evenly spaced between them by FLOPs rank."""
    pool = groundtruth.pick_archs(20 * n, seed, preset)
    pool.sort(key=lambda a: supernet.size_of(a, preset.shape)[0])
    inner = np.linspace(2, len(pool) - 3, n - 2).round().astype(int)[1:-1]
    return [pool[0], pool[1], *(pool[i] for i in inner), pool[-2], pool[-1]]


def projected_kendall(seed0, seed1, flops, uniform_flops) -> float:
    """Seed-vs-seed Kendall expected on uniform archs, from nets spread across the FLOPs range.

    Our reading of "projected": each net's score is true value + seed noise. The noise variance
    is half the mean squared seed difference. The true values are split into a part linear in
    log FLOPs (its slope fitted on the 2-seed means) and a residual, whose variance is what the
    means' residual variance has beyond their own noise (half the seed noise). A uniform sample
    has its own, narrower, spread of log FLOPs (`uniform_flops`); its true variance is
    slope^2 x that spread + the residual. The seed-vs-seed Pearson R is then true / (true +
    noise), and Kendall 2/pi asin(R) (the normal-copula relation of
    `report.spearman_brown_ceiling`).
    """
    a, b = np.asarray(seed0, float), np.asarray(seed1, float)
    x, mean = np.log(np.asarray(flops, float)), (a + b) / 2
    noise = np.mean((a - b) ** 2) / 2
    slope, intercept = np.polyfit(x, mean, 1)
    residual = max(0.0, np.var(mean - (slope * x + intercept), ddof=2) - noise / 2)
    true = slope ** 2 * np.var(np.log(uniform_flops), ddof=1) + residual
    return float(2 / np.pi * np.arcsin(true / (true + noise))) if true + noise > 0 else 0.0


def reading_row(codes, entries, reading: str, flops, uniform_flops) -> dict:
    """Seed-vs-seed agreement, its ceiling, FLOPs against the mean, for one reading
    (report.READINGS: cross-entropy enters negated, so that higher is better for all)."""
    scores = [[groundtruth.reading_of(e, reading) for e in seed] for seed in entries]
    per_seed = [dict(zip(codes, s)) for s in scores]
    mean = [(x + y) / 2 for x, y in zip(*scores)]
    ceiling = report.noise_ceiling(per_seed)
    return {"seed_vs_seed": ceiling["seed_vs_seed"], "ceiling": ceiling["ceiling"],
            "flops_vs_mean": report.rank_metrics(flops, mean),
            "projected_kendall": projected_kendall(*scores, flops, uniform_flops),
            "seed0": scores[0], "seed1": scores[1]}


def stored_archs(archs, gt: groundtruth.GroundTruth, preset, device) -> list[supernet.Arch]:
    """Those of `archs` whose nets of seeds 0 and 1 both have the preset's reading stored at
    its recipe: what `groundtruth.ground_truth` would not train again."""
    key = groundtruth.recipe_key(preset, device)
    return [a for a in archs if all(gt.get(supernet.encode(a), preset.dataset, key, s,
                                           preset.gt_reading) is not None for s in (0, 1))]


def budget_row(preset, archs, gt: groundtruth.GroundTruth, data, log, uniform_flops) -> dict:
    """Train what is missing of `archs` x seeds 0, 1 at this recipe; the row of the table,
    with every reading all its nets have (the oldest nets have top-1 only, those before
    2026-12-04 lack the flip-averaged cross-entropy)."""
    def say(event: str, **f):
        if event == "groundtruth" and f["seed"] == 1:
            log(f"  {preset.gt_epochs:g} epochs  arch {f['done'] // 2}/{len(archs)}  "
                f"{f['acc']:.4f} (seed 1)")

    truth, ceiling = groundtruth.ground_truth(gt, archs, 2, preset, data, say)
    key = groundtruth.recipe_key(preset, data.device)
    codes = [supernet.encode(a) for a in archs]
    entries = [[gt.entries[gt.key(c, preset.dataset, key, seed)] for c in codes] for seed in (0, 1)]
    accs = [[e["acc"] for e in seed] for seed in entries]
    top1 = [(a + b) / 2 for a, b in zip(*accs)]
    flops = [supernet.size_of(a, preset.shape)[0] for a in archs]
    readings = [r for r in report.READINGS if all(r in e for seed in entries for e in seed)]
    return {"epochs": preset.gt_epochs, "recipe": key, "n": len(archs),
            "reading": report.READINGS[preset.gt_reading][0],
            "readings": {r: reading_row(codes, entries, r, flops, uniform_flops)
                         for r in readings},
            "seed_vs_seed": ceiling["seed_vs_seed"], "ceiling": ceiling["ceiling"],
            "flops_vs_mean": report.rank_metrics(flops, list(truth.values())),
            "acc_min": min(top1), "acc_max": max(top1), "acc_sd": statistics.stdev(top1),
            "seed_diff_mean": statistics.mean(abs(a - b) for a, b in zip(*accs)),
            "seconds_per_net": statistics.mean(e["seconds"] for seed in entries for e in seed),
            "archs": codes, "acc_seed0": accs[0], "acc_seed1": accs[1]}


def table(rows: list[dict]) -> str:
    fm = report.format_metric
    lines = ["| epochs | reading | seed-vs-seed kendall | seed-vs-seed pearson "
             "| seed-vs-seed spearman | ceiling kendall (2-seed mean) | FLOPs vs mean kendall "
             "| top-1 range | mean top-1 seed diff | s per net | n |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["seed_vs_seed"]
        lines.append(f"| {r['epochs']:g} | {r.get('reading', 'top-1')} | {fm(s, 'kendall')} "
                     f"| {fm(s, 'pearson')} "
                     f"| {fm(s, 'spearman')} "
                     f"| {fm(r['ceiling'], 'kendall')} | {fm(r['flops_vs_mean'], 'kendall')} "
                     f"| {r['acc_min']:.4f}-{r['acc_max']:.4f} | {r['seed_diff_mean']:.4f} "
                     f"| {r['seconds_per_net']:.0f} | {r['n']} |")
    return "\n".join(lines)


def readings_table(rows: list[dict]) -> str:
    """Per budget and reading: which reading the seeds agree on most, and whether it ranks
    capacity (FLOPs against the mean > 0)."""
    fm = report.format_metric
    lines = ["| epochs | reading | seed-vs-seed kendall | seed-vs-seed pearson "
             "| ceiling kendall | FLOPs vs mean kendall "
             f"| seed-vs-seed kendall projected to {PROJECTED_N} uniform archs | n |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for name, m in r.get("readings", {}).items():
            s = m["seed_vs_seed"]
            label = report.READINGS[name][0]
            lines.append(f"| {r['epochs']:g} | {label} | {fm(s, 'kendall')} "
                         f"| {fm(s, 'pearson')} | {fm(m['ceiling'], 'kendall')} "
                         f"| {fm(m['flops_vs_mean'], 'kendall')} "
                         f"| {m['projected_kendall']:.3f} | {r['n']} |")
    return "\n".join(lines)


def main(preset: str = typer.Option("small", help="the recipe to vary: a preset's "
                                                  "ground-truth settings"),
         budgets: str = typer.Option("0.5,1,2", help="comma-separated training epochs"),
         archs: int = typer.Option(24, min=3, help="archs, each trained with 2 seeds per budget"),
         arch_seed: int = typer.Option(1000, help="sampling seed of the archs "
                                                  "(the headline set uses 0)"),
         spread: bool = typer.Option(False, help="archs across the FLOPs range, not uniform"),
         label_smoothing: float = typer.Option(None,
                                               help="override the preset's gt_label_smoothing"),
         train_subset: int = typer.Option(None, min=0, help="override the preset's train_subset "
                                                             "(0: all training images)"),
         image_size: int = typer.Option(None, min=8, help="override the preset's image size "
                                                          "(px)"),
         width_mult: float = typer.Option(None, min=0.0625, max=1.0,
                                          help="override the preset's width multiplier"),
         so_far: bool = typer.Option(False, help="train nothing: report on the archs whose "
                                                 "2 seeds are both stored"),
         device: str = "cpu", data_dir: Path = typer.Option(None),
         out: Path = ROOT / "bench" / "results"):
    if preset not in presets.PRESETS:
        raise typer.BadParameter(f"unknown preset {preset!r}; presets are "
                                 f"{', '.join(presets.PRESETS)}")
    # the settings overridden, each with the tag it adds to the output's name
    overrides = {field: (value, f"{tag}{value:g}") for field, value, tag in (
        ("gt_label_smoothing", label_smoothing, "ls"), ("train_subset", train_subset, "sub"),
        ("image_size", image_size, "px"), ("width_mult", width_mult, "w")) if value is not None}
    base = replace(presets.PRESETS[preset], **{f: v for f, (v, _) in overrides.items()})
    try:
        epochs_list = [float(b) for b in budgets.split(",")]
    except ValueError:
        raise typer.BadParameter(f"--budgets {budgets!r}: comma-separated numbers of epochs")
    presets.set_threads(base)
    try:
        data = load_data(base, device, data_dir)
    except DataError as e:
        raise typer.BadParameter(str(e))
    if spread and archs < 5:
        raise typer.BadParameter("--spread needs at least 5 archs")
    chosen = (spread_archs if spread else groundtruth.pick_archs)(archs, arch_seed, base)
    uniform_flops = [supernet.size_of(a, base.shape)[0]
                     for a in groundtruth.pick_archs(2000, arch_seed + 1, base)]
    gt = groundtruth.GroundTruth(groundtruth.SHARED_GROUND_TRUTH)
    rows = []
    for epochs in epochs_list:
        recipe = replace(base, gt_epochs=epochs)
        todo = stored_archs(chosen, gt, recipe, data.device) if so_far else chosen
        if len(todo) < 3:
            raise typer.BadParameter(f"{len(todo)} of {archs} archs have both seeds stored at "
                                     f"{epochs:g} epochs; --so-far needs 3")
        rows.append(budget_row(recipe, todo, gt, data, typer.echo, uniform_flops))
        typer.echo(table(rows[-1:]) + "\n\n" + readings_table(rows[-1:]))
    md = table(rows) + "\n\n" + readings_table(rows)
    typer.echo("\n" + md)
    name = (f"gt-recipe-{preset}" + "".join(f"-{tag}" for _, tag in overrides.values())
            + (f"-archseed{arch_seed}" if arch_seed != 1000 else "")
            + ("-spread" if spread else "") + ("-so-far" if so_far else ""))
    where = f"{device}, {torch.get_num_threads()} threads"
    counted = f"{rows[0]['n']} of {archs}" if so_far else f"{archs}"
    out.mkdir(parents=True, exist_ok=True)
    presets.write_json_atomic(out / f"{name}.json", {
        "date": date.today().isoformat(), "device": where, "preset": preset, "arch_seed": arch_seed,
        "settings": groundtruth.recipe_settings(base, device), "rows": rows})
    (out / f"{name}.md").write_text(f"Ground-truth signal by budget, preset {preset} ({where}), "
                                    f"{date.today().isoformat()}, {counted} archs (seed {arch_seed}"
                                    f"{', spread by FLOPs' if spread else ''}) "
                                    f"x 2 seeds"
                                    f"{'; so far: those with both seeds stored' if so_far else ''}"
                                    f".\n\n"
                                    f"{md}\n")
    typer.echo(f"wrote {out / name}.json and .md")


if __name__ == "__main__":
    typer.run(main)
