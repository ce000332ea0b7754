"""The statistics and the report: rank metrics with bootstrap intervals, paired differences,
the noise ceiling of a 2-seed ground truth, a challenge file written back with `acc` filled in
(a submission; supernet.read_challenge reads one), report.md and its scatter picture.

Every correlation comes from scipy.stats (Pearson, the paper's metric; Kendall tau, the
challenge's; Spearman), every interval from scipy.stats.bootstrap, and every figure states n.
"""

import json
import math
import os
import warnings
from pathlib import Path

import numpy as np
import scipy
import scipy.stats

import supernet
from presets import Preset, preset_from_config, write_json_atomic

# What of a stand-alone net can be its truth (`Preset.gt_reading`): the held-out top-1 of its
# EMA weights or minus its held-out cross-entropy (negated, so that for every reading higher is
# better), each also with flip averaging. bench/gt_recipe.py measures which of them the two
# seeds agree on most; groundtruth.py stores them all for every net (nets trained before
# 2026-12-04 lack "ce_flip").
READINGS = {"acc": ("top-1", 1), "acc_flip": ("top-1, flip-averaged", 1),
            "ce": ("minus test cross-entropy", -1),
            "ce_flip": ("minus test cross-entropy, flip-averaged", -1)}

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


# Bootstrap resamples behind every interval. NAS_BOOTSTRAP_RESAMPLES sets fewer (the tests
# and the processes they start use 200: intervals as wide, give or take, at a fifth of the time).
def _resamples_from_environment() -> int:
    text = os.environ.get("NAS_BOOTSTRAP_RESAMPLES", "1000")
    if not text.isdigit() or int(text) < 1:  # read on import: a line, not a traceback
        raise SystemExit(f"error: NAS_BOOTSTRAP_RESAMPLES={text!r} is not a whole number >= 1")
    return int(text)


N_BOOT = _resamples_from_environment()


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


def corrected_for_unreliability(value: float, seed_vs_seed: float, name: str) -> float | None:
    """`value` (a predictor against the 2-seed mean) corrected for the truth's unreliability:
    Spearman's (1904) correction for attenuation, r / sqrt(reliability), with the reliability of
    a mean of 2 seeds from Spearman-Brown, 2R / (1 + R) (R: seed against seed). An estimate of
    the agreement with the noise-free truth, so labelled "corrected" wherever it is shown, never
    a measurement. Kendall and Spearman go through the normal copula; where the division passes
    1 (noise can make it) it is clipped to 1. None where R <= 0: the truth is noise."""
    r = _as_pearson(seed_vs_seed, name)
    if not r > 0 or math.isnan(value):
        return None
    corrected = _as_pearson(value, name) / math.sqrt(2 * r / (1 + r))
    return _from_pearson(max(-1.0, min(1.0, corrected)), name)


# The correction divides by the ceiling (the root of the 2-seed mean's reliability). It is
# shown only where the low end of the ceiling's 95% interval, in Pearson's terms, reaches this:
# the division then at most doubles a value even there. Below it the divisor may be near 0, and
# a noisy truth would print as a near-perfect corrected score.
CORRECTION_FLOOR = 0.5


def correction_estimable(ceiling: dict, name: str) -> bool:
    """Whether a metric's correction is shown: the ceiling's interval clear of CORRECTION_FLOOR."""
    low = (ceiling.get(f"{name}_ci") or [0.0])[0]
    return _as_pearson(low, name) >= CORRECTION_FLOOR


def correction_withheld(ceiling: dict) -> str:
    """Why the report shows no corrected value, in words."""
    low = _as_pearson((ceiling.get("pearson_ci") or [0.0])[0], "pearson")
    return (f"Not corrected for the ground truth's unreliability: the low end of the ceiling's "
            f"95% interval is {low:.2f} (Pearson), below {CORRECTION_FLOOR}; the correction "
            "divides by the ceiling, and a divisor that may be near 0 makes any value look "
            "near-perfect.")


def corrected_metrics(metrics: dict, seed_vs_seed: dict, ceiling: dict) -> dict:
    """`corrected_for_unreliability` of every metric (point estimate and interval ends) whose
    `correction_estimable`; None for the others, and "withheld" (why) when none is."""
    out = {"n": metrics["n"]}
    for name in METRICS:
        estimable = correction_estimable(ceiling, name)
        out[name] = (corrected_for_unreliability(metrics[name], seed_vs_seed[name], name)
                     if estimable else None)
        ci = metrics.get(f"{name}_ci")
        if ci and out[name] is not None:
            out[f"{name}_ci"] = [corrected_for_unreliability(v, seed_vs_seed[name], name)
                                 for v in ci]
    if all(out[name] is None for name in METRICS):
        out["withheld"] = correction_withheld(ceiling)
    return out


def decisive_pair_agreement(pred, truth, seed_noise: float, n_boot: int | None = None,
                            seed: int = 0) -> dict:
    """The share of arch pairs that `pred` orders as the 2-seed mean `truth` does, over the pairs
    whose gap in the truth exceeds twice the seed noise (`seed_noise`: the sd of one net's
    accuracy around its arch's, `noise_ceiling`; the gap of two 2-seed means has that sd too):
    the pairs whose order the ground truth decides, at about 95%. 0.5 is chance. The interval
    resamples archs (pairs share archs: resampling pairs would pretend them independent)."""
    n_boot = N_BOOT if n_boot is None else n_boot
    pred, truth = np.asarray(pred, float), np.asarray(truth, float)

    def signs(p, t):  # the orders of pred and truth on the decided pairs
        i, j = np.triu_indices(len(t), 1)
        decided = np.abs(t[i] - t[j]) > 2 * seed_noise
        return np.sign(p[i] - p[j])[decided], np.sign(t[i] - t[j])[decided]

    def share(p, t):
        a, b = signs(p, t)
        return float(np.mean(a == b)) if len(a) else math.nan

    out = {"share": share(pred, truth), "n": len(truth), "threshold": 2 * seed_noise,
           "pairs": len(signs(pred, truth)[0])}
    if n_boot and out["pairs"] and len(truth) > 2:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            boot = scipy.stats.bootstrap((pred, truth), share, paired=True, vectorized=False,
                                         n_resamples=n_boot, method="percentile",
                                         **bootstrap_seed(seed))
        out["share_ci"] = [float(v) for v in
                           np.nanpercentile(boot.bootstrap_distribution, [2.5, 97.5])]
    return out


def predictor_extras(pred, truth, metrics: dict, ceiling: dict | None, flops) -> dict:
    """Beside a predictor's rank `metrics`: its Kendall with FLOPs (how much of its ranking is
    size alone), and, with 2 seeds, those metrics corrected for the truth's unreliability and
    its agreement on the pairs the truth decides."""
    out = {"kendall_with_flops": float(_kendall(pred, flops))}
    if ceiling and ceiling.get("seed_noise") is not None:
        out["corrected"] = corrected_metrics(metrics, ceiling["seed_vs_seed"],
                                             ceiling["ceiling"])
        out["decisive_pairs"] = decisive_pair_agreement(pred, truth, ceiling["seed_noise"])
    return out


def results_table(results: dict) -> dict:
    """The final table as rows {label: metrics}: the supernet, the FLOPs and params rankings,
    seed-vs-seed agreement and the noise ceiling (those two with 2 seeds only), and the
    supernet corrected for the truth's unreliability where that is estimable ({"note": why not}
    where it is not)."""
    rows = {"supernet": results["metrics"], "FLOPs": results["flops"],
            "params": results["params"]}
    ceiling = results.get("noise_ceiling")
    if ceiling:
        rows["seed vs seed (R)"] = ceiling["seed_vs_seed"]
        rows["ceiling"] = ceiling["ceiling"]
    corrected = results.get("corrected")
    if corrected:
        rows["supernet, corrected"] = ({"note": "not estimable: the ceiling may be near 0"}
                                       if "withheld" in corrected else corrected)
    return {"rows": rows}


def arch_sizes(codes, preset: Preset) -> tuple[list[int], list[int]]:
    """The preset's FLOPs and parameter counts of the archs `codes`: the rankings that cost no
    training, which a supernet must beat to be worth its own."""
    sizes = [supernet.size_of(supernet.decode(c), preset.shape) for c in codes]
    return [f for f, _ in sizes], [q for _, q in sizes]


def run_results(truth: dict, accs: dict, ceiling: dict | None, preset: Preset) -> dict:
    """Rank metrics of the supernet and of the FLOPs/params floors against the ground truth,
    and the supernet's `predictor_extras`."""
    pred, y = [accs[c] for c in truth], list(truth.values())
    flops, params = arch_sizes(truth, preset)
    metrics = rank_metrics(pred, y)
    seeds = (ceiling or {}).get("seeds", {})
    return {"metrics": metrics, "noise_ceiling": ceiling,
            "flops": rank_metrics(flops, y), "params": rank_metrics(params, y),
            **predictor_extras(pred, y, metrics, ceiling, flops),
            "archs": [{"arch": c, "supernet": accs[c], "truth": truth[c],
                       **({"seeds": seeds[c]} if c in seeds else {})} for c in truth]}


# ---------------------------------------------------------------- the noise ceiling

def noise_ceiling(per_seed: list[dict[str, float]]) -> dict | None:
    """How far any predictor can agree with the 2-seed mean: {"seed_vs_seed": R, "ceiling": ...}.

    R is the rank metrics of seed 0 against seed 1 over the same archs, with intervals; it is
    not itself a ceiling (the mean of 2 seeds is less noisy than either). `ceiling_metrics` maps
    it to what a predictor equal to the noise-free accuracy would reach against the mean.
    "seed_noise" is the sd of one net's accuracy around its arch's. None below 3 archs."""
    first, second = per_seed
    both = [c for c in first if c in second]
    if len(both) < 3:
        return None
    r = rank_metrics([first[c] for c in both], [second[c] for c in both])
    # one net's noise: the two seeds' differences have twice its variance
    diffs = [first[c] - second[c] for c in both]
    return {"seed_vs_seed": r, "ceiling": ceiling_metrics(r),
            "seed_noise": float(np.std(diffs, ddof=1) / math.sqrt(2)),
            "seeds": {c: [first[c], second[c]] for c in both}}


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


# ---------------------------------------------------------------- a submission

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
    the ground truth beside it (the ranking that costs nothing), each titled with Kendall tau.
    Each arch's two seeds are a vertical bar through its point (the truth is their mean): the
    truth's noise, drawn where it is read."""
    import matplotlib
    matplotlib.use("Agg")  # no screen needed
    import matplotlib.pyplot as plt

    rows = results["archs"]
    truth = [r["truth"] for r in rows]
    flops = [f / 1e6 for f in arch_sizes([r["arch"] for r in rows], preset)[0]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 4), sharey=True)
    for ax, xs in ((left, [r["supernet"] for r in rows]), (right, flops)):
        bars = [(x, r["seeds"]) for x, r in zip(xs, rows) if "seeds" in r]
        ax.vlines([x for x, _ in bars], [min(s) for _, s in bars], [max(s) for _, s in bars],
                  color="tab:gray", alpha=0.5, lw=1)
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


def extras_lines(results: dict) -> list[str]:
    """The report's lines on `predictor_extras` (absent in results written before them)."""
    lines = []
    if "kendall_with_flops" in results:
        lines += [f"Kendall of the supernet's accuracies with FLOPs: "
                  f"{results['kendall_with_flops']:.3f} (near 1 or -1: it ranks by size).", ""]
    corrected = results.get("corrected")
    if corrected and "withheld" in corrected:
        lines += [corrected["withheld"], ""]
    elif corrected and any(corrected.get(name) is not None for name in METRICS):
        cells = ", ".join(f"{name} {format_metric(corrected, name)}" for name in METRICS
                          if corrected[name] is not None)
        lines += [f"Corrected for the ground truth's unreliability (Spearman 1904, r / "
                  f"sqrt(2R / (1 + R)); an estimate, not a measurement; shown where the low "
                  f"end of the ceiling's interval is at least {CORRECTION_FLOOR} in Pearson's "
                  f"terms): {cells}.", ""]
    pairs = results.get("decisive_pairs")
    if pairs and pairs["pairs"]:
        ci = pairs.get("share_ci")
        interval = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
        plural = "s" if pairs["pairs"] != 1 else ""
        lines += [f"On the {pairs['pairs']} pair{plural} whose ground-truth gap exceeds twice the "
                  f"seed noise ({pairs['threshold']:.4f}), the supernet orders {pairs['share']:.3f}"
                  f"{interval} as the ground truth does (0.5 is chance).", ""]
    return lines


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
    lines += extras_lines(results)
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
