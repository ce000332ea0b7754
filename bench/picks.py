"""Does the supernet find better nets? Its search's picks against SPOS's, FLOPs' and chance.

    python bench/picks.py --preset small             # what is missing, in order; resumable
    python bench/picks.py --preset small --table     # the table from the committed files alone
                                                     # (until every net is in: how far they are)

The `small` ground truth cannot judge a ranking of single nets (its seeds agree at Kendall
0.095: BENCHMARKS.md), but a group of picked nets averages its seed noise away, and which nets
a search picks is what a user of a supernet gets. Under `nas.py all`'s budget (half the
largest arch's FLOPs), each way picks `--top` distinct nets (codes that build one net at the
preset count once, `search.best_distinct`):

- full: the full method's supernet (warm-up, APS, CPT, SSE34 with distillation), searched as
  `nas.py all` searches (its top-1 with inherited weights as fitness), one per supernet seed;
- spos: compute-matched SPOS's supernet, the same search code and seeds;
- flops, params: the same search with each candidate's FLOPs (parameters) at the preset as its
  fitness, search seed = supernet seed: the pick that costs no supernet;
- uniform: the headline ground truth's archs (arch seed 0, whatever the supernet seed) inside
  the budget, already trained.

Steps, each resumable, each result written as it finishes:
1. the supernets, `full` and `spos` at seeds 0..seeds-1, in runs/picks-<preset>/;
2. their searches (search.jsonl in each run folder), and their Kendall against the headline
   ground truth beside; every way's picks go into bench/results/picks-<preset>.json;
3. every picked net trained stand-alone with the preset's recipe x 2 seeds, into the committed
   bench/results/groundtruth.json (`--store`);
4. the table, bench/results/picks-<preset>.{json,md}: per way, per seed and pooled, the mean
   held-out cross-entropy and top-1 of its nets (each net the mean of its 2 seeds); the
   differences, with Welch's t-test and its 95% interval on seed-level means (the nets of one
   seed share a supernet and a search, so the seed is the unit; for uniform, each net is one:
   `compare` says why not a bootstrap); what the picked nets look like; and each way at equal
   FLOPs (`at_equal_flops`): does a search see anything in a net that its FLOPs do not?
"""

import json
import statistics
import subprocess
import sys
import time
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
from train_stages import METHODS  # noqa: E402

SEARCHED = ("full", "spos")   # ways that search a supernet of that method
SIZES = {"flops": 0, "params": 1}  # ways that search by size_of's FLOPs or parameters
WAYS = (*SEARCHED, *SIZES, "uniform")
COMPARISONS = (("full", "uniform"), ("full", "flops"), ("full", "spos"), ("spos", "uniform"),
               ("flops", "uniform"), ("params", "uniform"))


# ---------------------------------------------------------------- 1, 2: supernets and searches

def trained_supernet(method: str, seed: int, preset, data, folder: Path, log):
    """The supernet of `method` at `seed`, trained in folder/<method>-s<seed> or taken from
    there; a killed training goes on from its last checkpoint."""
    st = trainer.new_state(preset, METHODS[method], seed, data.device)
    run_dir = folder / f"{method}-s{seed}"
    if trainer.last_checkpoint(run_dir).exists():
        trainer.load_checkpoint(st, trainer.last_checkpoint(run_dir))
    if st.phase_index < len(st.phases()):
        trainer.train(st, data, run_dir, log, score=evaluate.make_scorer(preset, data))
    return st, run_dir


def search_picks(st, data, run_dir: Path, seed: int, top: int, log) -> dict:
    """`nas.py all`'s search on a trained supernet, its `top` best distinct nets, and the
    supernet's rank metrics on the headline ground truth's archs (for context)."""
    budget = search.default_budget()
    search.run_search(st, data, run_dir, budget, search.ALL_POPULATION, search.ALL_GENERATIONS,
                      seed, log)
    scores = search.SearchLog(run_dir / "search.jsonl", search.weights_key(st, data.device),
                              evaluate.machine_name(data.device)).top1
    admits = lambda a: search.challenge_size(a)[0] <= budget.flops  # noqa: E731
    picks = search.best_distinct(scores, top, st.preset.shape, admits)
    return {"archs": [supernet.encode(a) for a in picks],
            "supernet_top1": [scores[supernet.encode(a)] for a in picks],
            "evaluated": len(scores)}


def size_picks(kind: str, seed: int, preset, top: int) -> dict:
    """The same evolutionary search, each candidate scored by its FLOPs or parameters at the
    preset: the largest nets the budget admits, found as the supernet's search finds its."""
    budget = search.default_budget()
    admits = lambda a: search.challenge_size(a)[0] <= budget.flops  # noqa: E731

    def fitness(archs):
        return {supernet.encode(a): supernet.size_of(a, preset.shape)[SIZES[kind]] for a in archs}

    scores = search.evolve(fitness, admits, search.ALL_POPULATION, search.ALL_GENERATIONS, seed)
    picks = search.best_distinct(scores, top, preset.shape, admits)
    return {"archs": [supernet.encode(a) for a in picks], "evaluated": len(scores)}


def code_commit() -> str:
    """The commit the code runs at, "+" after it where tracked files outside bench/results
    differ from it (the results this script writes itself do not count)."""
    git = lambda *a: subprocess.run(["git", "-C", str(ROOT), *a],  # noqa: E731
                                    capture_output=True, text=True).stdout.strip()
    head = git("rev-parse", "--short", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results")
    return (head + "+" * bool(dirty)) if head else "unknown"


def headline_archs(preset) -> list[supernet.Arch]:
    """The headline ground truth's archs (arch seed 0): the same for every supernet seed."""
    return groundtruth.pick_archs(preset.gt_n, 0, preset)


def uniform_picks(preset) -> dict:
    budget = search.default_budget()
    inside = [a for a in headline_archs(preset) if search.challenge_size(a)[0] <= budget.flops]
    return {"archs": [supernet.encode(a) for a in inside]}


def kendall_on_headline(st, data, gt: groundtruth.GroundTruth, preset) -> dict | None:
    """The supernet's rank metrics against the headline ground truth, where it is stored."""
    recipe = groundtruth.recipe_key(preset, data.device)
    codes = [supernet.encode(a) for a in headline_archs(preset)]
    values = {c: [gt.get(c, preset.dataset, recipe, s, preset.gt_reading) for s in (0, 1)]
              for c in codes}
    if any(v is None for vs in values.values() for v in vs):
        return None
    accs = evaluate.evaluate_run(st, data, [supernet.decode(c) for c in codes], lambda *a, **k: 0)
    return report.rank_metrics([accs[c] for c in codes], [sum(values[c]) / 2 for c in codes])


# ---------------------------------------------------------------- 4: the table

def net_values(gt: groundtruth.GroundTruth, codes, preset, recipe: str, reading: str):
    """Each net's `reading` (the raw value: "ce" or "acc"), the mean of its 2 seeds; None where
    a seed is missing."""
    out = []
    for c in codes:
        entries = [gt.entries.get(gt.key(c, preset.dataset, recipe, s)) for s in (0, 1)]
        out.append(None if None in entries else sum(e[reading] for e in entries) / 2)
    return out


def units(way: str, groups: dict) -> list[list[float]]:
    """The independent units of a way: its seeds' groups of nets; for uniform, each net."""
    if way == "uniform":
        return [[v] for v in groups["uniform"]]
    return [groups[way][s] for s in sorted(groups[way])]


def compare(a: list[list[float]], b: list[list[float]]) -> dict:
    """mean(a) - mean(b) over the units' means, with Welch's t-test on those means (two-sided)
    and its 95% interval.

    Welch's t rather than a bootstrap: with 3 supernet seeds a side, a bootstrap interval is
    about a z-interval of a variance shrunk by (n - 1) / n, where Welch's t on 2 to 4 degrees
    of freedom needs 1.7 to 2.7 times the width. On the first 2 seeds of the small run, a
    two-level bootstrap (seeds, then nets) put full - flops at [+0.0011, +0.0063] while
    Welch's p was 0.11 and its interval [-0.0033, +0.0105]: the bootstrap called a difference
    that 2 seeds cannot show."""
    ma, mb = [float(np.mean(u)) for u in a], [float(np.mean(u)) for u in b]
    welch = scipy.stats.ttest_ind(ma, mb, equal_var=False)
    ci = welch.confidence_interval(0.95)
    return {"difference": float(np.mean(ma) - np.mean(mb)), "ci": [float(ci.low), float(ci.high)],
            "welch_p": float(welch.pvalue), "units": [len(a), len(b)]}


def looks(codes, mflops: dict) -> dict:
    """What a group of nets looks like: mean MFLOPs at the preset (`mflops`: code -> MFLOPs),
    challenge GFLOPs, depth and mean width % per stage."""
    archs = [supernet.decode(c) for c in codes]
    return {"mflops": statistics.mean(mflops[c] for c in codes),
            "challenge_gflops": statistics.mean(search.challenge_size(a)[0]
                                                for a in archs) / 1e9,
            "depths": [round(statistics.mean(a.depths[s] for a in archs), 2) for s in range(4)],
            "widths": [round(statistics.mean(supernet.stage_widths(a)[s] for a in archs), 1)
                       for s in range(4)]}


def table(state: dict, gt: groundtruth.GroundTruth, preset, recipe: str) -> dict:
    """Every figure of the table from the picks and the stored nets; while nets are untrained,
    {"missing": n, "trained": {pick: [trained, nets]}} instead."""
    picks = state["picks"]
    mflops = {c: supernet.size_of(supernet.decode(c), preset.shape)[0] / 1e6
              for pick in picks.values() for c in pick["archs"]}  # each net counted once
    groups = {"ce": {}, "acc": {}, "mflops": {}}
    trained = {}
    for key, pick in picks.items():
        way, _, seed = key.partition("-s")
        for reading in groups:
            values = (net_values(gt, pick["archs"], preset, recipe, reading)
                      if reading != "mflops" else [mflops[c] for c in pick["archs"]])
            if way == "uniform":
                groups[reading]["uniform"] = values
            else:
                groups[reading].setdefault(way, {})[int(seed)] = values
        ce = groups["ce"]["uniform"] if way == "uniform" else groups["ce"][way][int(seed)]
        trained[key] = [len(ce) - ce.count(None), len(ce)]  # "acc" alike: one entry holds both
    missing = sum(nets - n for n, nets in trained.values())
    if missing:
        return {"missing": missing, "trained": trained}
    ways = [w for w in WAYS if w in groups["ce"]]
    out = {"ways": {}, "comparisons": {}}
    for way in ways:
        codes = ([c for k, p in picks.items() if k.startswith(f"{way}-") for c in p["archs"]]
                 if way != "uniform" else picks["uniform"]["archs"])
        row = {"nets": len(codes), "looks": looks(codes, mflops)}
        for reading in ("ce", "acc"):
            u = units(way, groups[reading])
            row[reading] = {"pooled": float(np.mean([v for g in u for v in g])),
                            "per_seed": ([float(np.mean(g)) for g in u] if way != "uniform"
                                         else None)}
        out["ways"][way] = row
    for a, b in COMPARISONS:
        if a in ways and b in ways:
            out["comparisons"][f"{a} - {b}"] = {
                reading: compare(units(a, groups[reading]), units(b, groups[reading]))
                for reading in ("ce", "acc")}
    out["at_equal_flops"] = at_equal_flops(groups["ce"], groups["mflops"])
    return out


def at_equal_flops(ce: dict, mflops: dict) -> dict | None:
    """Does a way pick nets better than their FLOPs alone predict? Each net's cross-entropy
    minus a straight line through the uniform nets' (MFLOPs, cross-entropy), the fit of an
    unbiased sample of the budget; each way's residuals against the uniform nets' by `compare`.

    A way that picks larger nets and is better only by their size comes out level here; one
    below 0 sees something FLOPs cannot. That needs a line that measures the size effect: its
    slope's 95% interval ("slope_ci") must exclude 0, or there is nothing to adjust by and the
    residuals are the raw comparisons tilted by noise (`equal_flops_lines` then says so and
    judges nothing). The line's own uncertainty is not in the residuals' intervals: read them
    beside the raw comparisons. None with under 3 sizes to fit a line to."""
    if len(set(mflops["uniform"])) < 3:
        return None
    line = scipy.stats.linregress(mflops["uniform"], ce["uniform"])
    half = scipy.stats.t.ppf(0.975, len(ce["uniform"]) - 2) * line.stderr

    def residuals(values, sizes):
        return [v - (line.intercept + line.slope * x) for v, x in zip(values, sizes)]

    resid = {way: (residuals(ce[way], mflops[way]) if way == "uniform" else
                   {s: residuals(ce[way][s], mflops[way][s]) for s in ce[way]}) for way in ce}
    return {"slope_per_mflop": float(line.slope),
            "slope_ci": [float(line.slope - half), float(line.slope + half)],
            "intercept": float(line.intercept), "r": float(line.rvalue),
            "comparisons": {f"{way} - uniform": compare(units(way, resid),
                                                        units("uniform", resid))
                            for way in WAYS if way in ce and way != "uniform"}}


def equal_flops_lines(flat: dict | None) -> list[str]:
    """The at-equal-FLOPs reading in words: a sentence per way where the uniform nets measure a
    size effect, else one line saying there is none to adjust by."""
    if not flat:
        return []
    lo, hi = flat["slope_ci"]
    line = (f"slope {flat['slope_per_mflop']:+.4f} [{lo:+.4f}, {hi:+.4f}] of cross-entropy "
            f"per MFLOP, r = {flat['r']:.2f}")
    if lo <= 0 <= hi:
        return ["", f"At equal FLOPs: the uniform nets show no measurable size effect inside the "
                    f"budget ({line}), so there is no line to judge the picks at equal FLOPs by; "
                    "the raw comparisons above are the reading."]
    return (["", f"At equal FLOPs: each net's cross-entropy against a line through the uniform "
                 f"nets' ({line}); the line's own uncertainty is not in these intervals.", ""]
            + [f"- {equal_flops_sentence(name, c)}" for name, c in flat["comparisons"].items()])


WAY_NAMES = {"full": "the full method's search", "spos": "SPOS's search",
             "flops": "FLOPs as fitness", "params": "parameters as fitness",
             "uniform": "uniform draws"}


def plain_sentence(name: str, c: dict) -> str:
    """One comparison in words: which way's nets are better by held-out cross-entropy (lower is
    better) where its 95% interval (Welch's) excludes 0, and top-1 beside it."""
    a, b = (WAY_NAMES[w] for w in name.split(" - "))
    ce, acc = c["ce"], c["acc"]
    lo, hi = ce["ci"]
    numbers = (f"cross-entropy {ce['difference']:+.4f} [{lo:+.4f}, {hi:+.4f}], Welch p "
               f"{p_text(ce['welch_p'])}; top-1 {acc['difference'] * 100:+.2f} points "
               f"[{acc['ci'][0] * 100:+.2f}, {acc['ci'][1] * 100:+.2f}]")
    if not (hi < 0 or lo > 0):  # holds 0 (or is undefined: a side without spread)
        sentence = f"{a} against {b}: no measurable difference ({numbers}; the interval holds 0)."
    else:
        better, worse = (a, b) if hi < 0 else (b, a)
        sentence = (f"{better} picks better nets than {worse}, by the headline reading ({a} "
                    f"minus {b}: {numbers}).")
    return sentence[0].upper() + sentence[1:]


def p_text(p: float) -> str:
    """A p-value as a sentence prints it: two digits, a small one keeping its first digit."""
    return f"{p:.2f}" if p >= 0.01 else f"{p:.3f}" if p >= 0.001 else "< 0.001"


def equal_flops_sentence(name: str, c: dict) -> str:
    """One way against what its nets' FLOPs predict (`at_equal_flops`), in words."""
    way = WAY_NAMES[name.split(" - ")[0]]
    lo, hi = c["ci"]
    numbers = (f"{c['difference']:+.4f} [{lo:+.4f}, {hi:+.4f}] of cross-entropy from the line, "
               f"Welch p {p_text(c['welch_p'])}")
    if not (hi < 0 or lo > 0):
        verdict = "as good as their FLOPs predict, no more"
    else:
        verdict = "better" if hi < 0 else "worse"
        verdict += " than their FLOPs predict"
    sentence = f"{way}: its nets are {verdict} ({numbers})."
    return sentence[0].upper() + sentence[1:]


def markdown(result: dict, preset) -> str:
    t = result["table"]
    if "missing" in t:
        return (f"{t['missing']} picked nets are not trained yet: no table. Trained so far: "
                + ", ".join(f"{k} {n}/{of}" for k, (n, of) in t["trained"].items()) + ".")
    lines = [f"Picks under {result['budget']}, preset {preset.name}, {result['seeds']} supernet "
             f"seeds, {result['top']} distinct nets a pick; each net the mean of 2 stand-alone "
             "seeds. Held-out cross-entropy: lower is better.", "",
             "| way | nets | cross-entropy, pooled | per seed | top-1, pooled | per seed | "
             "MFLOPs | depths | width % |", "|---|---|---|---|---|---|---|---|---|"]
    for way, r in t["ways"].items():
        seeds = lambda k: (" / ".join(f"{v:.4f}" for v in r[k]["per_seed"])  # noqa: E731
                           if r[k]["per_seed"] else "")
        look = r["looks"]
        lines.append(f"| {way} | {r['nets']} | {r['ce']['pooled']:.4f} | {seeds('ce')} | "
                     f"{r['acc']['pooled']:.4f} | {seeds('acc')} | {look['mflops']:.2f} | "
                     f"{' '.join(f'{d:g}' for d in look['depths'])} | "
                     f"{' '.join(f'{w:g}' for w in look['widths'])} |")
    lines += ["", "| difference | cross-entropy [95% interval], Welch p | top-1 [95% interval], "
                  "Welch p | units |", "|---|---|---|---|"]
    for name, c in t["comparisons"].items():
        cells = [f"{c[k]['difference']:+.4f} [{c[k]['ci'][0]:+.4f}, {c[k]['ci'][1]:+.4f}], "
                 f"p {c[k]['welch_p']:.3f}" for k in ("ce", "acc")]
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {c['ce']['units'][0]} vs "
                     f"{c['ce']['units'][1]} |")
    lines += [""] + [f"- {plain_sentence(name, c)}" for name, c in t["comparisons"].items()]
    lines += equal_flops_lines(t["at_equal_flops"])
    context = {k: v.get("kendall") for k, v in result["picks"].items() if v.get("kendall")}
    if context:
        lines += ["", "Each supernet's Kendall against the headline ground truth (n = "
                      f"{preset.gt_n}, for context): " + ", ".join(
                          f"{k} {v['kendall']:.3f}" for k, v in context.items()) + "."]
    return "\n".join(lines)


# ---------------------------------------------------------------- the steps in order

def main(preset: str = typer.Option("small", help="a preset with a stored headline ground "
                                                  "truth (small)"),
         seeds: int = typer.Option(3, min=2, help="supernet (and search) seeds"),
         top: int = typer.Option(4, min=2, help="distinct nets a way picks"),
         table_only: bool = typer.Option(False, "--table", help="the table from the committed "
                                                                "files alone: nothing trained"),
         device: str = "cpu", data_dir: Path = typer.Option(None),
         runs: Path = typer.Option(ROOT / "runs"),
         store: Path = typer.Option(groundtruth.SHARED_GROUND_TRUTH,
                                    help="the ground-truth file each net is written into"),
         out: Path = typer.Option(ROOT / "bench" / "results")):
    if preset not in presets.PRESETS:
        raise typer.BadParameter(f"unknown preset {preset!r}")
    p = presets.PRESETS[preset]
    path = out / f"picks-{p.name}.json"
    state = json.loads(path.read_text()) if path.exists() else {"picks": {}}
    state.update(preset=p.name, seeds=seeds, top=top, budget=search.default_budget().describe())
    out.mkdir(parents=True, exist_ok=True)

    def save():
        presets.write_json_atomic(path, state)

    presets.set_threads(p)
    gt = groundtruth.GroundTruth(store)
    if not table_only:
        try:
            device = presets.pick_device(device)
            data = load_data(p, device, data_dir)
        except (ValueError, DataError) as e:
            raise typer.BadParameter(str(e))
        folder = runs / f"picks-{p.name}"
        folder.mkdir(parents=True, exist_ok=True)
        log = ablation.echo(events.EventLog(folder / "events.jsonl"))
        commit = code_commit()  # at the start: the code this process loaded
        for method in SEARCHED:
            for seed in range(seeds):
                key = f"{method}-s{seed}"
                if key in state["picks"]:
                    continue
                started = time.perf_counter()
                st, run_dir = trained_supernet(method, seed, p, data, folder, log)
                trained = time.perf_counter()
                pick = search_picks(st, data, run_dir, seed, top, log)
                pick["kendall"] = kendall_on_headline(st, data, gt, p)
                pick["commit"] = commit
                # wall seconds of this process (a job paused meanwhile counts its pause)
                pick["seconds"] = {"training": trained - started,
                                   "search": time.perf_counter() - trained}
                state["picks"][key] = pick
                save()
                typer.echo(f"{key}: picks {pick['archs']}")
        for kind in SIZES:
            for seed in range(seeds):
                state["picks"].setdefault(f"{kind}-s{seed}", size_picks(kind, seed, p, top))
        state["picks"]["uniform"] = uniform_picks(p)
        save()
        # every picked net, stand-alone x 2 seeds, seed by seed across the ways
        order = [key for seed in range(seeds) for key in (f"{w}-s{seed}" for w in (*SEARCHED,
                                                                                    *SIZES))]
        archs = list(dict.fromkeys(supernet.decode(c) for key in order + ["uniform"]
                                   for c in state["picks"][key]["archs"]))
        groundtruth.ground_truth(gt, archs, 2, p, data, log)
        recipe = groundtruth.recipe_key(p, data.device)
    else:
        recipe = state.get("recipe") or groundtruth.recipe_key(p, "cpu")
    state["recipe"] = recipe
    state["date"] = date.today().isoformat()
    state["table"] = table(state, gt, p, recipe)
    save()
    md = markdown(state, p)
    (out / f"picks-{p.name}.md").write_text(md + "\n")
    typer.echo(md)
    typer.echo(f"wrote {path} and {path.with_suffix('.md')}")


if __name__ == "__main__":
    typer.run(main)
