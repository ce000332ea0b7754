"""The papers' ablation on one dataset and one budget, against one ground truth.

    python bench/ablation.py --preset tiny      # CPU: proves the machinery, not the method
    python bench/ablation.py --preset small     # CPU: against the committed ground truth
    python bench/ablation.py --preset cifar     # one GPU: the real table
    python bench/ablation.py --preset fashion --data-dir D   # cifar's budget, Fashion-MNIST

Variants (APS/CPT/SSE paper, Tables 1-3, and Π-NAS): SPOS, PS, APS_v1, APS_v2, APS_v3, +CPT,
+SSE4, +SSE34, +SSE34+Dis, Π-NAS, and Π-NAS followed by APS_v3+CPT+SSE34+Dis; and FLOPs and
parameter count as rankings that cost no training. Each variant goes on from the checkpoint of
the variant it extends, as in the paper (all supervised ones from one warm-up), so the table
costs little more than its longest chain. Training times are reported whole: a variant's own
stages plus those of the chain it starts from (a variant resumed after a kill counts from the
resume). SPOS is compute-matched: as many forward/backward passes as APS depth + width.
The full method (+SSE34+Dis) also gets its Kendall, Pearson and Spearman differences against
FLOPs, params and SPOS with paired-bootstrap intervals, and so does each step of the paper's
order (PS, APS_v3, +CPT, +SSE4, +SSE34, +SSE34+Dis) against the step before it.

Everything lands in runs/ablation-<preset>/ (ground truth, one checkpoint per variant, events),
so a killed ablation run again skips what is done. Writes
bench/results/ablation-<preset>-<device>.json and .md.
"""

import json
import sys
import time
from datetime import date
from pathlib import Path

import typer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import evaluate  # noqa: E402
import events  # noqa: E402
import groundtruth  # noqa: E402
import presets  # noqa: E402
import report  # noqa: E402
import supernet  # noqa: E402
import trainer  # noqa: E402
from data import DataError, load_data  # noqa: E402

APS = ("warmup", "aps_depth", "aps_width")
# name: (stages, APS version, KD, the variant it goes on from)
VARIANTS = {
    "SPOS": (("warmup", "spos"), "v3", False, "warm-up"),
    "PS": (("warmup", "ps_depth", "ps_width"), "v3", False, "warm-up"),
    "APS_v1": (APS, "v1", False, "warm-up"),
    "APS_v2": (APS, "v2", False, "warm-up"),
    "APS_v3": (APS, "v3", False, "warm-up"),
    "APS_v3+CPT": (APS + ("cpt",), "v3", False, "APS_v3"),
    "+SSE4": (APS + ("cpt", "sse4"), "v3", False, "APS_v3+CPT"),
    "+SSE34": (APS + ("cpt", "sse34"), "v3", False, "APS_v3+CPT"),
    "+SSE34+Dis": (APS + ("cpt", "sse34"), "v3", True, "APS_v3+CPT"),
    "Pi-NAS": (("pinas", "linear_head"), "v3", False, "Pi-NAS-pre"),
    "Pi-NAS+APS_v3+CPT+SSE34+Dis": (("pinas",) + APS + ("cpt", "sse34"), "v3", True, "Pi-NAS-pre"),
}
# chain links that are not variants themselves, and the controls of bench/mechanisms.py
BASES = {"warm-up": (("warmup",), "v3", False, None), "Pi-NAS-pre": (("pinas",), "v3", False, None),
         "+SSE34-shared": (APS + ("cpt", "sse34_shared"), "v3", False, "APS_v3+CPT"),
         "Pi-NAS-same-path-pre": (("pinas_same_path",), "v3", False, None)}
PAPER_PEARSON = {"PS": 0.79884, "APS_v2": 0.80141, "APS_v3": 0.80263, "APS_v3+CPT": 0.81415,
                 "+SSE4": 0.82166, "+SSE34": 0.83768, "+SSE34+Dis": 0.84652}


def train_variant(name: str, preset: presets.Preset, data, device: str, folder: Path, log,
                  seed: int) -> tuple:
    """The variant's trained state and its whole training time; what is done is never redone:
    a finished variant is loaded, an interrupted one resumed from its last checkpoint."""
    stages, aps, kd, parent = {**BASES, **VARIANTS}[name]
    st = trainer.new_state(preset, stages, seed, device, aps, kd)
    final = folder / "checkpoints" / f"{name}.pt"
    run_dir = folder / name
    if final.exists() and final.with_suffix(".json").exists():  # the json is written last
        trainer.load_checkpoint(st, final)
        return st, json.loads(final.with_suffix(".json").read_text())["seconds"]
    seconds = train_variant(parent, preset, data, device, folder, log, seed)[1] if parent else 0.0
    if trainer.last_checkpoint(run_dir).exists():
        trainer.load_checkpoint(st, trainer.last_checkpoint(run_dir))
    elif parent:
        trainer.load_checkpoint(st, folder / "checkpoints" / f"{parent}.pt", extend=True)
    t = time.perf_counter()
    trainer.train(st, data, run_dir, log, score=evaluate.make_scorer(preset, data))
    seconds += time.perf_counter() - t
    trainer.save_checkpoint(st, final)
    presets.write_json_atomic(final.with_suffix(".json"), {"seconds": seconds})  # done: last
    return st, seconds


FULL = "+SSE34+Dis"


def targets(rows: list[dict], ceiling: dict | None, differences: dict) -> dict:
    """The method's goals for the full pipeline's Kendall tau, where the rows to judge are there:
    per goal, whether the point estimates meet it, and, against a baseline, the paired 95%
    interval of the difference, which says whether the archs sampled could have decided it."""
    tau = {r["variant"]: r["metrics"]["kendall"] for r in rows}
    full, out = tau.get(FULL), {}
    if full is None:
        return out
    for base, label in (("FLOPs", "FLOPs + 0.05 or more"),
                        ("SPOS", "SPOS (compute-matched) + 0.05 or more")):
        if base in tau:
            out[label] = {"met": full >= tau[base] + 0.05, "difference": full - tau[base],
                          "interval": differences[base]["kendall_ci"]}
    top = ceiling["ceiling"]["kendall"] if ceiling else 0.0
    if top > 0:  # a ceiling of 0 says the ground truth is noise
        out["80% of the noise ceiling or more"] = {"met": full >= 0.8 * top}
    return out


def verdict_lines(verdicts: dict, rows: list[dict]) -> str:
    lines = []
    for goal, v in verdicts.items():
        line = f"Target, Kendall tau of {FULL}: {goal}: {'met' if v['met'] else 'NOT met'}"
        if "interval" in v:
            lo, hi = v["interval"]
            sure = "above" if lo > 0.05 else "not above"
            line += (f" by the point estimates (difference {v['difference']:.3f}; its paired "
                     f"95% interval [{lo:.3f}, {hi:.3f}] is {sure} 0.05)")
        lines.append(line)
    floor = {r["variant"]: r["metrics"] for r in rows}.get("FLOPs", {"kendall": 0.0})
    flops = floor["kendall"]
    if floor.get("kendall_ci", (flops, flops))[1] < 0:  # decidedly backwards, not just below 0
        lines.append(f"FLOPs rank these archs backwards (Kendall {flops:.3f}): the reversed "
                     f"ranking, smaller is better, reaches {-flops:.3f}, so beating FLOPs' own "
                     "Kendall says little here")
    return "".join(f"\n\n{line}." for line in lines)


def paired_differences(rows: list[dict], truth: dict, flops: list, params: list) -> dict:
    """The full method minus FLOPs, params and SPOS, per metric, with paired-bootstrap
    intervals (`flops`, `params`: the archs' of `truth`, in its order)."""
    accs = {r["variant"]: r["accs"] for r in rows if "accs" in r}
    if FULL not in accs:
        return {}
    y = list(truth.values())
    full = [accs[FULL][c] for c in truth]
    out = {"FLOPs": report.paired_difference(full, flops, y),
           "params": report.paired_difference(full, params, y)}
    if "SPOS" in accs:
        out["SPOS"] = report.paired_difference(full, [accs["SPOS"][c] for c in truth], y)
    return out


# The paper's ablation order (APS/CPT/SSE paper, Tables 1-3): each variant adds one idea to
# the one before it, and the paper finds each step a gain (PS <= APS_v3 <= ... <= +SSE34+Dis).
PAPER_STEPS = ("PS", "APS_v3", "APS_v3+CPT", "+SSE4", "+SSE34", "+SSE34+Dis")


def step_differences(rows: list[dict], truth: dict) -> dict:
    """Each step of the paper's order that both ends of were run: the later variant minus the
    earlier, per metric, with paired-bootstrap intervals over the same archs ("later - earlier")."""
    accs = {r["variant"]: r["accs"] for r in rows if "accs" in r}
    y = list(truth.values())
    ran = [v for v in PAPER_STEPS if v in accs]
    return {f"{b} - {a}": report.paired_difference([accs[b][c] for c in truth],
                                                   [accs[a][c] for c in truth], y)
            for a, b in zip(ran, ran[1:])}


def differences_table(differences: dict, steps: dict) -> str:
    lines = []
    for title, rows in ((f"{FULL} minus the baseline, paired bootstrap over the same archs:",
                         differences),
                        ("The paper's ablation order, step by step (each variant run minus the "
                         "one before it in the order), paired bootstrap over the same archs:",
                         steps)):
        if rows:
            lines += ["", "", title, "", "| difference | pearson | kendall | spearman |",
                      "|---|---|---|---|"]
            lines += [f"| {name} | " + " | ".join(report.format_metric(d, k)
                                                  for k in report.METRICS) + " |"
                      for name, d in rows.items()]
    return "\n".join(lines)


def table(rows: list[dict], ceiling: dict | None) -> str:
    lines = ["| variant | pearson | kendall | spearman | kendall, corrected for the truth's "
             "unreliability | agreement on decided pairs | kendall with FLOPs | n | training s "
             "| paper pearson |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r["metrics"]
        cells = [report.format_metric(m, k) for k in report.METRICS]
        corrected = r.get("corrected")
        cells.append("" if not corrected else report.format_metric(corrected, "kendall")
                     if corrected["kendall"] is not None else "not estimable")
        pairs = r.get("decisive_pairs")
        cells.append(report.format_metric(pairs, "share") + f" of {pairs['pairs']}"
                     if pairs and pairs["pairs"] else "")
        cells.append(f"{r['kendall_with_flops']:.3f}" if "kendall_with_flops" in r else "")
        seconds = f"{r['seconds']:.0f}" if r["seconds"] is not None else "none"
        paper = f"{PAPER_PEARSON[r['variant']]:.5f}" if r["variant"] in PAPER_PEARSON else ""
        lines.append(f"| {r['variant']} | {' | '.join(cells)} | {m['n']} | {seconds} | {paper} |")
    if ceiling:
        for label, m in (("seed 0 vs seed 1 (R)", ceiling["seed_vs_seed"]),
                         ("ceiling against the 2-seed mean", ceiling["ceiling"])):
            cells = " | ".join(report.format_metric(m, k) for k in report.METRICS)
            lines.append(f"| {label} | {cells} | | | | {m['n']} | | |")
    if ceiling and "seed_noise" in ceiling:
        lines += ["", f"Decided pairs: those whose gap in the 2-seed mean exceeds twice the seed "
                      f"noise (one net's sd around its arch, {ceiling['seed_noise']:.4f}); "
                      "corrected: Spearman (1904), an estimate, not a measurement."]
    return "\n".join(lines)


def echo(log: events.EventLog):
    """The event log, with events.describe's line on the terminal for each phase end, warning
    and stand-alone net."""
    def log_and_echo(event: str, **f):
        record = log(event, **f)
        if event in ("phase_end", "warning", "groundtruth"):
            typer.echo(f"  {events.describe(record)}", err=event == "warning")
        return record
    return log_and_echo


def main(preset: str = typer.Option("cifar", help=", ".join(presets.PRESETS)),
         variants: str = typer.Option(",".join(VARIANTS), help="comma-separated variants to run"),
         gt_n: int = typer.Option(None, min=3,
                                  help="ground-truth archs (default: the preset's)"),
         seed: int = 0, device: str = "auto", data_dir: Path = typer.Option(None),
         runs: Path = typer.Option(ROOT / "runs", help="where the ablation's run folder goes"),
         out: Path = typer.Option(ROOT / "bench" / "results", help="where the table goes")):
    if preset not in presets.PRESETS:
        raise typer.BadParameter(f"unknown preset {preset!r}; presets are "
                                 f"{', '.join(presets.PRESETS)}")
    p = presets.PRESETS[preset]
    chosen = [v.strip() for v in variants.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown:
        raise typer.BadParameter(f"unknown variant {unknown[0]!r}; variants are "
                                 f"{', '.join(VARIANTS)}")
    try:
        device = presets.pick_device(device)
        presets.set_threads(p)
        data = load_data(p, device, data_dir)
    except (ValueError, DataError) as e:
        raise typer.BadParameter(str(e))
    folder = runs / f"ablation-{p.name}"
    (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
    log = echo(events.EventLog(folder / "events.jsonl"))
    n = gt_n or p.gt_n
    truth, ceiling = groundtruth.build_ground_truth(folder, p, data, log, n, p.gt_seeds, seed)
    archs, y = [supernet.decode(c) for c in truth], list(truth.values())
    flops, params = report.arch_sizes(truth, p)

    def row(variant: str, pred: list, seconds) -> dict:
        metrics = report.rank_metrics(pred, y)
        return {"variant": variant, "metrics": metrics, "seconds": seconds,
                **report.predictor_extras(pred, y, metrics, ceiling, flops)}
    rows = [row("FLOPs", flops, None), row("params", params, None)]
    for name in chosen:
        st, seconds = train_variant(name, p, data, device, folder, log, seed)
        accs = evaluate.evaluate_run(st, data, archs, log)
        rows.append({**row(name, [accs[c] for c in truth], seconds),
                     "stages": list(st.stages), "aps": st.aps, "kd": st.kd, "accs": accs})
        typer.echo(f"{name:30} kendall {report.format_metric(rows[-1]['metrics'], 'kendall')}  "
                   f"{seconds:.0f} s")
    machine = evaluate.machine_name(device)
    differences = paired_differences(rows, truth, flops, params)
    steps = step_differences(rows, truth)
    md = table(rows, ceiling) + differences_table(differences, steps)
    verdicts = targets(rows, ceiling, differences)
    md += verdict_lines(verdicts, rows)
    typer.echo("\n" + md)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"ablation-{p.name}-{device}"
    presets.write_json_atomic(stem.with_suffix(".json"), {
        "date": date.today().isoformat(), "device": machine, "preset": p.name, "dataset": p.dataset,
        "seed": seed, "ground_truth": truth, "noise_ceiling": ceiling, "targets": verdicts,
        "rows": rows, "differences": differences, "steps": steps})
    stem.with_suffix(".md").write_text(f"Ablation, preset {p.name} ({p.dataset}), {machine}, "
                                       f"{date.today().isoformat()}, n = {len(truth)} archs."
                                       f"\n\n{md}\n")
    typer.echo(f"wrote {stem.with_suffix('.json')} and .md")


if __name__ == "__main__":
    typer.run(main)
