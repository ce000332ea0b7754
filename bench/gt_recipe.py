"""How much signal a stand-alone ground truth has, as a function of its training budget.

    python bench/gt_recipe.py --preset small --budgets 0.5,1,2 --archs 24

Trains the same archs with two seeds at each budget (epochs of the preset's training set, the
rest of the preset's recipe unchanged; `--train-subset` and `--label-smoothing` override those
two settings) and reports, per budget: seed-vs-seed Pearson, Kendall
and Spearman with 95% intervals; the ceiling they imply for any predictor against the 2-seed
mean (evaluate.ceiling_of); Kendall tau of FLOPs against that mean (positive: the ground truth
ranks capacity, not speed of training); the spread of accuracies; the seconds per net.

The archs are sampled uniformly from the challenge space with their own seed (`--arch-seed`,
never the headline archs' seed 0), so a recipe is never chosen on the archs it is judged on.
Every net lands in the committed bench/results/groundtruth.json as it finishes (its recipe
hash keeps budgets apart): a killed run goes on where it stopped, and a rerun only reads.
Writes bench/results/gt-recipe-<preset>[-ls<x>][-sub<n>][-archseed<s>].json and .md.
"""

import statistics
import sys
from dataclasses import replace
from datetime import date
from pathlib import Path

import torch
import typer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import evaluate  # noqa: E402
import supernet  # noqa: E402
import train_stages  # noqa: E402
from data import DataError, load_data  # noqa: E402


def budget_row(preset, archs, gt: evaluate.GroundTruth, data, log) -> dict:
    """Train what is missing of `archs` x seeds 0, 1 at this recipe; the row of the table."""
    def say(event: str, **f):
        if event == "groundtruth" and f["seed"] == 1:
            log(f"  {preset.gt_epochs:g} epochs  arch {f['done'] // 2}/{len(archs)}  "
                f"{f['acc']:.4f} (seed 1)")

    truth, ceiling = evaluate.ground_truth(gt, archs, 2, preset, data, say)
    key = evaluate.recipe(preset, data.device)
    codes = [supernet.encode(a) for a in archs]
    entries = [[gt.entries[gt.key(c, preset.dataset, key, seed)] for c in codes] for seed in (0, 1)]
    accs = [[e["acc"] for e in seed] for seed in entries]
    mean = list(truth.values())
    flops = [supernet.size_of(a, preset.shape)[0] for a in archs]
    return {"epochs": preset.gt_epochs, "recipe": key, "n": len(archs),
            "seed_vs_seed": ceiling["seed_vs_seed"], "ceiling": ceiling["ceiling"],
            "flops_vs_mean": evaluate.rank_metrics(flops, mean),
            "acc_min": min(mean), "acc_max": max(mean), "acc_sd": statistics.stdev(mean),
            "seed_diff_mean": statistics.mean(abs(a - b) for a, b in zip(*accs)),
            "seconds_per_net": statistics.mean(e["seconds"] for seed in entries for e in seed),
            "archs": codes, "acc_seed0": accs[0], "acc_seed1": accs[1]}


def table(rows: list[dict]) -> str:
    fm = evaluate.format_metric
    lines = ["| epochs | seed-vs-seed kendall | seed-vs-seed pearson | seed-vs-seed spearman "
             "| ceiling kendall (2-seed mean) | FLOPs vs mean kendall | top-1 range "
             "| mean seed diff | s per net | n |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["seed_vs_seed"]
        lines.append(f"| {r['epochs']:g} | {fm(s, 'kendall')} | {fm(s, 'pearson')} "
                     f"| {fm(s, 'spearman')} "
                     f"| {fm(r['ceiling'], 'kendall')} | {fm(r['flops_vs_mean'], 'kendall')} "
                     f"| {r['acc_min']:.4f}-{r['acc_max']:.4f} | {r['seed_diff_mean']:.4f} "
                     f"| {r['seconds_per_net']:.0f} | {r['n']} |")
    return "\n".join(lines)


def main(preset: str = typer.Option("small", help="the recipe to vary: a preset's "
                                                  "ground-truth settings"),
         budgets: str = typer.Option("0.5,1,2", help="comma-separated training epochs"),
         archs: int = typer.Option(24, min=3, help="archs, each trained with 2 seeds per budget"),
         arch_seed: int = typer.Option(1000, help="sampling seed of the archs "
                                                  "(the headline set uses 0)"),
         label_smoothing: float = typer.Option(None,
                                               help="override the preset's gt_label_smoothing"),
         train_subset: int = typer.Option(None, min=0, help="override the preset's train_subset "
                                                             "(0: all training images)"),
         device: str = "cpu", data_dir: Path = typer.Option(None),
         out: Path = ROOT / "bench" / "results"):
    if preset not in train_stages.PRESETS:
        raise typer.BadParameter(f"unknown preset {preset!r}; presets are "
                                 f"{', '.join(train_stages.PRESETS)}")
    base = train_stages.PRESETS[preset]
    if label_smoothing is not None:
        base = replace(base, gt_label_smoothing=label_smoothing)
    if train_subset is not None:
        base = replace(base, train_subset=train_subset)
    try:
        epochs_list = [float(b) for b in budgets.split(",")]
    except ValueError:
        raise typer.BadParameter(f"--budgets {budgets!r}: comma-separated numbers of epochs")
    train_stages.set_threads(base)
    try:
        data = load_data(base, device, data_dir)
    except DataError as e:
        raise typer.BadParameter(str(e))
    chosen = evaluate.pick_archs(archs, arch_seed, base)
    gt = evaluate.GroundTruth(evaluate.SHARED_GROUND_TRUTH)
    rows = []
    for epochs in epochs_list:
        rows.append(budget_row(replace(base, gt_epochs=epochs), chosen, gt, data, typer.echo))
        typer.echo(table(rows[-1:]))
    md = table(rows)
    typer.echo("\n" + md)
    name = (f"gt-recipe-{preset}"
            + (f"-ls{label_smoothing:g}" if label_smoothing is not None else "")
            + (f"-sub{train_subset}" if train_subset is not None else "")
            + (f"-archseed{arch_seed}" if arch_seed != 1000 else ""))
    where = f"{device}, {torch.get_num_threads()} threads"
    out.mkdir(parents=True, exist_ok=True)
    evaluate.write_json_atomic(out / f"{name}.json", {
        "date": date.today().isoformat(), "device": where, "preset": preset, "arch_seed": arch_seed,
        "settings": evaluate.recipe_settings(base, device), "rows": rows})
    (out / f"{name}.md").write_text(f"Ground-truth signal by budget, preset {preset} ({where}), "
                                    f"{date.today().isoformat()}, {archs} archs (seed {arch_seed}) "
                                    f"x 2 seeds.\n\n"
                                    f"{md}\n")
    typer.echo(f"wrote {out / name}.json and .md")


if __name__ == "__main__":
    typer.run(main)
