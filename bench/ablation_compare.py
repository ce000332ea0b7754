"""Two runs of bench/ablation.py on the same ground truth, variant by variant: the later run
minus the earlier, per metric, with paired-bootstrap intervals over the same archs.

    python bench/ablation_compare.py bench/results/ablation-small-cpu-before-fidelity.json \\
        bench/results/ablation-small-cpu.json --out bench/results/ablation-small-fidelity

Made for a change of the method's code (the method as the paper's text reads, then as the
official code trains it): which variants did it move, and by more than the noise? A variant
whose stages the change left alone predicts the same accuracies in both runs (the "same"
column), which checks that claim on every arch. Reads the two JSON files alone; trains nothing.
"""

import json
import sys
from pathlib import Path

import typer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import report  # noqa: E402


def compare(before: dict, after: dict) -> dict:
    """{variant: after minus before (report.paired_difference's fields), plus "same": whether
    every arch's accuracy is equal}, for each variant both runs evaluated, in `after`'s order."""
    if before.get("ground_truth") != after.get("ground_truth"):
        raise ValueError("the two runs ranked different ground truths; their variants cannot be "
                         "compared arch by arch")
    truth = after["ground_truth"]
    y = list(truth.values())
    earlier = {r["variant"]: r["accs"] for r in before["rows"] if "accs" in r}
    out = {}
    for r in after["rows"]:
        if "accs" not in r or r["variant"] not in earlier:
            continue
        a = [r["accs"][c] for c in truth]
        b = [earlier[r["variant"]][c] for c in truth]
        out[r["variant"]] = {**report.paired_difference(a, b, y), "same": a == b}
    return out


def table(before: dict, after: dict, differences: dict) -> str:
    metrics = {run: {r["variant"]: r["metrics"] for r in data["rows"]}
               for run, data in (("before", before), ("after", after))}
    lines = ["| variant | kendall, before | kendall, after | after - before: kendall | pearson "
             "| spearman | same predictions |", "|---|---|---|---|---|---|---|"]
    for v, d in differences.items():
        cells = [report.format_metric(metrics["before"][v], "kendall"),
                 report.format_metric(metrics["after"][v], "kendall")]
        cells += [report.format_metric(d, k) for k in ("kendall", "pearson", "spearman")]
        cells.append("yes" if d["same"] else "no")
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def read_run(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        if not isinstance(data.get("rows"), list) or "ground_truth" not in data:
            raise ValueError("no rows or ground truth")
        return data
    except (OSError, ValueError, AttributeError) as e:
        raise typer.BadParameter(f"{path} is not an ablation result of bench/ablation.py ({e})")


def main(before: Path = typer.Argument(..., help="the earlier run's ablation JSON"),
         after: Path = typer.Argument(..., help="the later run's ablation JSON"),
         out: Path = typer.Option(None, help="write OUT.json and OUT.md (default: print only)")):
    earlier, later = read_run(before), read_run(after)
    try:
        differences = compare(earlier, later)
    except ValueError as e:
        raise typer.BadParameter(str(e))
    md = (f"{after.name} ({later['date']}) minus {before.name} ({earlier['date']}), preset "
          f"{later['preset']}, n = {len(later['ground_truth'])} archs, paired bootstrap over the "
          f"same archs, 95% intervals.\n\n{table(earlier, later, differences)}\n")
    typer.echo(md)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(
            {"before": str(before), "after": str(after), "differences": differences}, indent=1))
        out.with_suffix(".md").write_text(md)
        typer.echo(f"wrote {out.with_suffix('.json')} and .md")


if __name__ == "__main__":
    typer.run(main)
