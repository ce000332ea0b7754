"""The statistics and the report: rank metrics with bootstrap intervals, paired differences,
the noise ceiling of a 2-seed ground truth, the challenge's file format, report.md and its
scatter picture.

Every correlation comes from scipy.stats (Pearson, the paper's metric; Kendall tau, the
challenge's; Spearman), every interval from scipy.stats.bootstrap, and every figure states n.
"""

import json
import math
import warnings
from pathlib import Path

import numpy as np
import scipy
import scipy.stats

import supernet
from presets import Preset, preset_from_config, write_json_atomic

# What of a stand-alone net can be its truth (`Preset.gt_reading`): the held-out top-1 of its
# EMA weights, the same with flip averaging, or minus its held-out cross-entropy (negated, so
# that for every reading higher is better). bench/gt_recipe.py measures which of them the two
# seeds agree on most; groundtruth.py stores all three for every net.
READINGS = {"acc": ("top-1", 1), "acc_flip": ("top-1, flip-averaged", 1),
            "ce": ("minus test cross-entropy", -1)}

# ---------------------------------------------------------------- rank metrics

def _pearson(a, b):
    return scipy.stats.pearsonr(a, b).statistic


def _kendall(a, b):
    return scipy.stats.kendalltau(a, b).statistic


def _spearman(a, b):
    return scipy.stats.spearmanr(a, b).statistic


METRICS = {"pearson": _pearson, "kendall": _kendall, "spearman": _spearman}
# scipy.stats.bootstrap takes its generator as `rng` from scipy 1.15 on, as `random_state`
# before (and warns about that name after): the same generator either way.
SCIPY_VERSION = tuple(int(v) for v in scipy.__version__.split(".")[:2])
SEED_ARGUMENT = "rng" if SCIPY_VERSION >= (1, 15) else "random_state"


def bootstrap_seed(seed: int) -> dict:
    return {SEED_ARGUMENT: np.random.default_rng(seed)}


N_BOOT = 1000  # bootstrap resamples behind every interval


def rank_metrics(pred, truth, n_boot: int | None = None, seed: int = 0) -> dict:
    """Pearson, Kendall tau and Spearman of pred vs truth, each with a bootstrap 95% interval
    (percentile method, pairs resampled; resamples too degenerate to correlate are left out)
    when n_boot > 0 (default `N_BOOT`), and n."""
    n_boot = N_BOOT if n_boot is None else n_boot
    pred = np.asarray(pred, float)
    truth = np.asarray(truth, float)
    out = {"n": len(pred)}
    with warnings.catch_warnings():  # constant inputs (tiny resamples) give nan, which is the truth
        warnings.simplefilter("ignore")
        for name, fn in METRICS.items():
            out[name] = float(fn(pred, truth)) if len(pred) > 1 else math.nan
            if n_boot and len(pred) > 2:
                boot = scipy.stats.bootstrap((pred, truth), fn, paired=True, vectorized=False,
                                             n_resamples=n_boot, method="percentile",
                                             **bootstrap_seed(seed))
                bounds = np.nanpercentile(boot.bootstrap_distribution, [2.5, 97.5])
                out[f"{name}_ci"] = [float(v) for v in bounds]
    return out


def paired_difference(pred_a, pred_b, truth, n_boot: int | None = None, seed: int = 0) -> dict:
    """How much better `pred_a` ranks `truth` than `pred_b` does, per metric, with a 95% paired
    bootstrap interval: the same resampled archs score both predictors, so what the two share
    (which archs happen to be in the sample) cancels out of the difference."""
    n_boot = N_BOOT if n_boot is None else n_boot
    a, b, t = (np.asarray(v, float) for v in (pred_a, pred_b, truth))
    out = {"n": len(t)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, fn in METRICS.items():
            out[name] = float(fn(a, t) - fn(b, t))
            boot = scipy.stats.bootstrap((a, b, t), lambda a, b, t: fn(a, t) - fn(b, t),
                                         paired=True, vectorized=False, n_resamples=n_boot,
                                         method="percentile", **bootstrap_seed(seed))
            bounds = np.nanpercentile(boot.bootstrap_distribution, [2.5, 97.5])
            out[f"{name}_ci"] = [float(v) for v in bounds]
    return out


def results_table(results: dict) -> dict:
    """The final table as rows {label: metrics}: the supernet, the FLOPs and params rankings,
    seed-vs-seed agreement and the noise ceiling (those two with 2 seeds only)."""
    rows = {"supernet": results["metrics"], "FLOPs": results["flops"],
            "params": results["params"]}
    ceiling = results.get("noise_ceiling")
    if ceiling:
        rows["seed vs seed (R)"] = ceiling["seed_vs_seed"]
        rows["ceiling"] = ceiling["ceiling"]
    return {"rows": rows}


def size_floors(truth: dict[str, float], preset: Preset) -> dict:
    """Rank metrics of FLOPs and of parameter count against the ground truth: rankings that cost
    no training, which a supernet must beat to be worth its own."""
    y = list(truth.values())
    sizes = [supernet.size_of(supernet.decode(c), preset.shape) for c in truth]
    return {"flops": rank_metrics([f for f, _ in sizes], y),
            "params": rank_metrics([p for _, p in sizes], y)}


def run_results(truth: dict, accs: dict, ceiling: dict | None, preset: Preset) -> dict:
    """Rank metrics of the supernet and of the FLOPs/params floors against the ground truth."""
    return {"metrics": rank_metrics([accs[c] for c in truth], list(truth.values())),
            "noise_ceiling": ceiling, **size_floors(truth, preset),
            "archs": [{"arch": c, "supernet": accs[c], "truth": truth[c]} for c in truth]}


# ---------------------------------------------------------------- the noise ceiling

def noise_ceiling(per_seed: list[dict[str, float]]) -> dict | None:
    """How far any predictor can agree with the 2-seed mean: {"seed_vs_seed": R, "ceiling": ...}.

    R is the rank metrics of seed 0 against seed 1 over the same archs, with intervals; it is
    not itself a ceiling (the mean of 2 seeds is less noisy than either). `ceiling_metrics` maps
    it to what a predictor equal to the noise-free accuracy would reach against the mean.
    None below 3 archs."""
    first, second = per_seed
    both = [c for c in first if c in second]
    if len(both) < 3:
        return None
    r = rank_metrics([first[c] for c in both], [second[c] for c in both])
    return {"seed_vs_seed": r, "ceiling": ceiling_metrics(r)}


def _as_pearson(value: float, name: str) -> float:
    """The Pearson r of a bivariate normal with this Kendall tau or Spearman rho (Greiner's
    relation tau = 2/pi asin r, and rho = 6/pi asin(r/2))."""
    if name == "kendall":
        return math.sin(math.pi * value / 2)
    if name == "spearman":
        return 2 * math.sin(math.pi * value / 6)
    return value


def _from_pearson(r: float, name: str) -> float:
    if name == "kendall":
        return 2 / math.pi * math.asin(r)
    if name == "spearman":
        return 6 / math.pi * math.asin(r / 2)
    return r


def spearman_brown_ceiling(value: float, name: str) -> float:
    """What a perfect predictor reaches against the mean of 2 seeds, given seed-vs-seed `value`.

    Seed-vs-seed agreement R is the split-half reliability of one seed's accuracy:
    R = var(true) / (var(true) + noise). The 2-seed mean halves the noise, so its reliability
    is 2R / (1 + R) (Spearman-Brown), and a predictor equal to the true accuracy correlates
    with it at the square root of that. Kendall and Spearman go through the normal-copula
    relations to Pearson and back. R <= 0 says the seeds share nothing: the ceiling is 0.
    """
    r = _as_pearson(value, name)
    if not r > 0:
        return 0.0
    return _from_pearson(math.sqrt(2 * r / (1 + r)), name)


def ceiling_metrics(seed_vs_seed: dict) -> dict:
    """`spearman_brown_ceiling` of every metric of a seed-vs-seed result, its interval mapped
    end by end (the map is increasing, so a percentile interval stays one)."""
    out = {"n": seed_vs_seed["n"]}
    for name in METRICS:
        out[name] = spearman_brown_ceiling(seed_vs_seed[name], name)
        if f"{name}_ci" in seed_vs_seed:
            out[f"{name}_ci"] = [spearman_brown_ceiling(v, name)
                                 for v in seed_vs_seed[f"{name}_ci"]]
    return out


# ---------------------------------------------------------------- the challenge's file format

def read_challenge(path: Path) -> dict[str, str]:
    """{name: code} from a challenge-format file; ValueError naming the file or the entry."""
    try:
        entries = json.loads(Path(path).read_text())
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}")
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON: {e}")
    if not isinstance(entries, dict) or not entries:
        raise ValueError(f"{path} must hold a non-empty object of "
                         "{name: {\"arch\": code, \"acc\": ...}}")
    codes = {}
    for name, entry in entries.items():
        code = entry.get("arch") if isinstance(entry, dict) else None
        if not isinstance(code, str):
            raise ValueError(f"{path}: entry {name!r} has no \"arch\" string")
        try:
            codes[name] = supernet.encode(supernet.decode(code))
        except ValueError as e:
            raise ValueError(f"{path}: entry {name!r}: {e}")
    return codes


def write_challenge(path: Path, codes: dict[str, str], accs: dict[str, float]) -> None:
    """The same format with `acc` filled in: a submission."""
    filled = {name: {"acc": accs[code], "arch": code} for name, code in codes.items()}
    write_json_atomic(Path(path), filled)


def format_metric(m: dict, name: str) -> str:
    ci = m.get(f"{name}_ci")
    return f"{m[name]:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{m[name]:.3f}"


CEILING_NOTE = (
    "The ground truth is the mean of 2 seeds. Seed 0 against seed 1 (R) is the agreement of two "
    "equally noisy measurements, not a ceiling: the ceiling is what a predictor equal to the "
    "noise-free accuracy would reach against the 2-seed mean, sqrt(2R / (1 + R)) for Pearson "
    "(the Spearman-Brown reliability of a mean of 2), with Kendall and Spearman mapped through "
    "their normal-copula relations to Pearson (tau = 2/pi asin r, rho = 6/pi asin(r/2)).")


def write_scatter(path: Path, results: dict, preset: Preset) -> Path:
    """A PNG: supernet accuracy against the ground truth, one point per arch, and FLOPs against
    the ground truth beside it (the ranking that costs nothing), each titled with Kendall tau."""
    import matplotlib
    matplotlib.use("Agg")  # no screen needed
    import matplotlib.pyplot as plt

    rows = results["archs"]
    truth = [r["truth"] for r in rows]
    flops = [supernet.size_of(supernet.decode(r["arch"]), preset.shape)[0] / 1e6
             for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 4), sharey=True)
    left.scatter([r["supernet"] for r in rows], truth, s=14)
    left.set(xlabel="supernet top-1 (inherited weights, BN recalibrated)",
             ylabel=f"ground truth: {READINGS[preset.gt_reading][0]} (stand-alone)",
             title=f"supernet: Kendall {results['metrics']['kendall']:.3f}")
    right.scatter(flops, truth, s=14, color="tab:gray")
    right.set(xlabel=f"MFLOPs at {preset.image_size} px",
              title=f"FLOPs: Kendall {results['flops']['kendall']:.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def search_section(summary: dict | None) -> list[str]:
    """The report's lines on the search under a budget, if the run made one."""
    if not summary:
        return []
    lines = ["## Search", "", f"Evolutionary search under {summary['budget']} (challenge units: "
             f"full width, 224 px), {summary['evaluated']} archs evaluated.", ""]
    best = summary["best"]
    if best is None:
        return lines + ["No evaluated arch meets the budget.", ""]
    return lines + [f"Best: `{best['arch']}`, supernet top-1 {best['top1']:.4f}, "
                    f"{best['flops'] / 1e9:.3f} GFLOPs ({best['preset_flops'] / 1e6:.2f} "
                    "MFLOPs at this preset).", "", "![the search](search.png)", ""]


def write_report(run_dir: Path, config: dict, results: dict) -> Path:
    """`report.md`: stages, rank metrics with intervals beside the FLOPs and params rankings,
    seed-vs-seed agreement and the noise ceiling, a scatter picture (`scatter.png`), the best
    archs, and supernet accuracy against ground truth as a text table."""
    m, ceiling = results["metrics"], results.get("noise_ceiling")
    preset = preset_from_config(config)
    kd = "on" if config["kd"] else "off"
    columns = [("supernet", m), ("FLOPs", results["flops"]), ("params", results["params"])]
    if ceiling:
        columns += [("seed 0 vs seed 1 (R)", ceiling["seed_vs_seed"]),
                    ("ceiling", ceiling["ceiling"])]
    lines = [f"# Run {run_dir.name}", "",
             f"Preset `{preset.name}` ({preset.dataset}), stages {' → '.join(config['stages'])}, "
             f"APS {config['aps']}, KD {kd}, seed {config['seed']}.",
             "", "## Rank consistency", "",
             f"Against the ground truth of n = {m['n']} archs; 95% bootstrap intervals.", "",
             "| metric | " + " | ".join(label for label, _ in columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    for name in METRICS:
        lines.append(f"| {name} | " + " | ".join(format_metric(c, name) for _, c in columns) + " |")
    lines += ["", CEILING_NOTE if ceiling else "One seed per arch: no noise ceiling.", ""]
    scatter = write_scatter(run_dir / "scatter.png", results, preset)
    lines += [f"![supernet and FLOPs against the ground truth]({scatter.name})", ""]
    lines += search_section(results.get("search"))
    lines += ["## Best archs by supernet accuracy", "",
              "| arch | supernet | ground truth |", "|---|---|---|"]
    rows = sorted(results["archs"], key=lambda r: -r["supernet"])
    for r in rows[:10]:
        lines.append(f"| `{r['arch']}` | {r['supernet']:.4f} | {r['truth']:.4f} |")
    lines += ["", "## Supernet accuracy against ground truth", "", "```",
              f"{'rank gt':>7} {'rank sn':>7} {'ground truth':>12} {'supernet':>9}"]
    by_truth = sorted(rows, key=lambda r: -r["truth"])
    supernet_rank = {r["arch"]: i + 1 for i, r in enumerate(rows)}
    for i, r in enumerate(by_truth):
        lines.append(f"{i + 1:>7} {supernet_rank[r['arch']]:>7} {r['truth']:>12.4f} "
                     f"{r['supernet']:>9.4f}")
    lines.append("```")
    path = run_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
