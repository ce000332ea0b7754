"""Evaluation: BN recalibration, subnet accuracy, stand-alone ground truth, rank metrics,
the challenge's JSON format, and the report.

A subnet's accuracy with inherited weights means nothing until its BN statistics are its own:
the supernet's running statistics mix every sampled arch. So every evaluation first
recalibrates BN on a fixed, seeded set of training batches (paper Sec. 3.1: 50 x 256), then
measures top-1 on the held-out split. The supernet is never copied: statistics are written
into the sliced running buffers, which the next arch's calibration overwrites again.
"""

import hashlib
import json
import math
import os
import random
import time
import warnings
from pathlib import Path

import numpy as np
import scipy.stats
import torch
import torch.nn as nn
import torch.nn.functional as F

import supernet as sn
import train_stages as ts

# ---------------------------------------------------------------- BN recalibration and accuracy


def _bns(net: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]


@torch.no_grad()
def calibrate_bn(net: nn.Module, arch: sn.Arch | None, batches: list[torch.Tensor]) -> None:
    """Set the BN running statistics of `arch` to the exact mean of its per-batch statistics.

    With momentum 1/(i+1) at batch i, BN's running update r <- (1-m) r + m b is the running
    mean of the batch statistics b (mean, and unbiased variance as BN keeps it), so after the
    last batch it is their exact average, not an EMA. Only the arch's slices are written.
    `arch` is None for a static net.
    """
    bns = _bns(net)
    momenta = [bn.momentum for bn in bns]
    net.train()
    try:
        for i, x in enumerate(batches):
            for bn in bns:
                bn.momentum = 1.0 / (i + 1)
            with ts.autocast(x.device):
                net(x) if arch is None else net(x, arch)
    finally:
        for bn, m in zip(bns, momenta):
            bn.momentum = m
        net.eval()


@torch.no_grad()
def accuracy(net: nn.Module, arch: sn.Arch | None, batches) -> float:
    """Top-1 on the held-out batches; one host sync at the end."""
    net.eval()
    correct = torch.zeros((), dtype=torch.long, device=batches[0][0].device)
    total = 0
    for x, y in batches:
        with ts.autocast(x.device):
            logits = net(x) if arch is None else net(x, arch)
        correct += (logits.argmax(1) == y).sum()
        total += len(y)
    return correct.item() / total


def evaluate_archs(st: ts.TrainState, archs: list[sn.Arch], calib, evals, progress=None) -> dict[str, float]:
    """Accuracy of each arch with inherited weights: {code: top-1}.

    When the run has sub-supernets (SSE), each arch is evaluated with the one that owns it:
    archs are grouped by owner so each sub-supernet's weights are loaded once. The net holds
    the same weights afterwards as before.
    """
    sse = next((s for s in st.stages if s in ("sse4", "sse34")), None) if st.subnets else None
    groups: dict[int | None, list[sn.Arch]] = {}
    for a in archs:
        groups.setdefault(ts.sse_owner(a, sse) if sse else None, []).append(a)
    before, results, done = st.current_sub, {}, 0
    for owner, members in groups.items():
        if owner is not None:
            ts.swap_sub(st, owner)
        for a in members:
            calibrate_bn(st.net, a, calib)
            results[sn.encode(a)] = accuracy(st.net, a, evals)
            done += 1
            if progress:
                progress(done, len(archs))
    if sse:
        ts.swap_sub(st, before)
    return {sn.encode(a): results[sn.encode(a)] for a in archs}


# ---------------------------------------------------------------- rank metrics

def _pearson(a, b):
    return scipy.stats.pearsonr(a, b).statistic


def _kendall(a, b):
    return scipy.stats.kendalltau(a, b).statistic


def _spearman(a, b):
    return scipy.stats.spearmanr(a, b).statistic


METRICS = {"pearson": _pearson, "kendall": _kendall, "spearman": _spearman}


def rank_metrics(pred, truth, n_boot: int = 1000, seed: int = 0) -> dict:
    """Pearson, Kendall tau and Spearman of pred vs truth, each with a bootstrap 95% interval
    (percentile method, pairs resampled; resamples too degenerate to correlate are left out)
    when n_boot > 0, and n."""
    pred, truth = np.asarray(pred, float), np.asarray(truth, float)
    out = {"n": len(pred)}
    with warnings.catch_warnings():  # constant inputs (tiny resamples) give nan, which is the truth
        warnings.simplefilter("ignore")
        for name, fn in METRICS.items():
            out[name] = float(fn(pred, truth)) if len(pred) > 1 else math.nan
            if n_boot and len(pred) > 2:
                boot = scipy.stats.bootstrap((pred, truth), fn, paired=True, vectorized=False, n_resamples=n_boot,
                                             method="percentile", rng=np.random.default_rng(seed))
                out[f"{name}_ci"] = [float(v) for v in np.nanpercentile(boot.bootstrap_distribution, [2.5, 97.5])]
    return out


# ---------------------------------------------------------------- stand-alone ground truth

def recipe(preset: ts.Preset) -> str:
    """What a ground-truth accuracy depends on besides arch, dataset and seed."""
    fields = (preset.width_mult, preset.divisor, preset.image_size, preset.batch_size, preset.gt_epochs,
              preset.gt_lr, preset.train_subset, preset.eval_subset)
    return "gt-" + hashlib.sha1(repr(fields).encode()).hexdigest()[:10]


def train_standalone(arch: sn.Arch, preset: ts.Preset, data, seed: int) -> float:
    """Train `arch` from scratch as a static net with the preset's recipe; held-out top-1.

    SGD (momentum 0.9, nesterov, weight decay 5e-4), linear warm-up then cosine, the same
    augmentation as the supernet; `gt_epochs` epochs of the (sub)set.
    """
    torch.manual_seed(seed)
    device = data.device
    net = sn.StaticNet(arch, preset.shape).to(device)
    if device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=preset.gt_lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps = max(1, round(preset.gt_epochs * data.train_size / preset.batch_size))
    key = ts._mix(seed, 0x67)
    net.train()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = ts.lr_at(step, steps, preset.gt_lr)
        x, y = data.train_batch(key, step, preset.batch_size)
        with ts.autocast(device):
            loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if not math.isfinite(loss.item()):
        raise ts.TrainingError(f"non-finite loss training {sn.encode(arch)} stand-alone (seed {seed})")
    return accuracy(net, None, data.eval_batches(preset.eval_subset, 500))


def pick_archs(n: int, seed: int, preset: ts.Preset) -> list[sn.Arch]:
    """n archs stratified over FLOPs: sort 10n uniform samples by FLOPs, one per equal stratum."""
    rng = random.Random(seed)
    pool = list(dict.fromkeys(sn.sample_arch(rng) for _ in range(10 * n)))
    pool.sort(key=lambda a: sn.count_flops_params(a, preset.image_size, preset.shape)[0])
    edges = np.linspace(0, len(pool), n + 1).astype(int)
    return [pool[rng.randrange(lo, hi)] for lo, hi in zip(edges[:-1], edges[1:])]


class GroundTruth:
    """`groundtruth.json`: stand-alone accuracies keyed by arch, dataset, recipe and seed.

    Written atomically after every arch, so an interrupted job continues where it stopped and
    nothing is trained twice."""

    def __init__(self, path: Path):
        self.path = path
        self.entries: dict[str, dict] = {}
        if path.exists():
            try:
                self.entries = {self.key(**{k: e[k] for k in ("arch", "dataset", "recipe", "seed")}): e
                                for e in json.loads(path.read_text())["entries"]}
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path} is not a ground-truth file ({type(e).__name__}: {e})")

    @staticmethod
    def key(arch: str, dataset: str, recipe: str, seed: int) -> str:
        return f"{arch}|{dataset}|{recipe}|{seed}"

    def get(self, arch: str, dataset: str, recipe: str, seed: int) -> float | None:
        e = self.entries.get(self.key(arch, dataset, recipe, seed))
        return None if e is None else e["acc"]

    def put(self, arch: str, dataset: str, recipe: str, seed: int, acc: float, seconds: float) -> None:
        self.entries[self.key(arch, dataset, recipe, seed)] = {
            "arch": arch, "dataset": dataset, "recipe": recipe, "seed": seed, "acc": acc, "seconds": seconds}
        write_json_atomic(self.path, {"entries": list(self.entries.values())})

    def accs(self, dataset: str, recipe: str, seed: int) -> dict[str, float]:
        return {e["arch"]: e["acc"] for e in self.entries.values()
                if e["dataset"] == dataset and e["recipe"] == recipe and e["seed"] == seed}


def ground_truth(gt: GroundTruth, archs: list[sn.Arch], twice: list[sn.Arch], preset: ts.Preset, data,
                 log) -> tuple[dict[str, float], dict | None]:
    """Train what is not cached yet (`twice` also with seed 1); return {code: acc} (seed 0)
    and the noise ceiling."""
    r = recipe(preset)
    jobs = [(a, 0) for a in archs] + [(a, 1) for a in twice]
    for i, (a, seed) in enumerate(jobs):
        code = sn.encode(a)
        acc = gt.get(code, preset.dataset, r, seed)
        if acc is None:
            t = time.perf_counter()
            acc = train_standalone(a, preset, data, seed)
            gt.put(code, preset.dataset, r, seed, acc, time.perf_counter() - t)
        log("groundtruth", done=i + 1, total=len(jobs), arch=code, acc=acc, seed=seed)
    first = gt.accs(preset.dataset, r, 0)
    return {sn.encode(a): first[sn.encode(a)] for a in archs}, noise_ceiling(gt, preset)


def noise_ceiling(gt: GroundTruth, preset: ts.Preset) -> dict | None:
    """Rank metrics between seed 0 and seed 1 over the archs trained with both (None below 3):
    the agreement no supernet can beat."""
    r = recipe(preset)
    first, second = gt.accs(preset.dataset, r, 0), gt.accs(preset.dataset, r, 1)
    both = [c for c in second if c in first]
    return rank_metrics([first[c] for c in both], [second[c] for c in both]) if len(both) > 2 else None


# ---------------------------------------------------------------- probes during training

def make_probe(preset: ts.Preset, data, truth: dict[str, float]):
    """A cheap running rank correlation for the training loop: the ground-truth archs with a
    smaller calibration set and eval subset, no bootstrap."""
    archs = [sn.decode(c) for c in truth]
    calib = data.calib_batches(preset.probe_calib_batches, preset.calib_batch_size, seed=1)
    evals = data.eval_batches(preset.probe_eval_images, 500)

    def probe(st: ts.TrainState) -> dict | None:
        accs = evaluate_archs(st, archs, calib, evals)
        return rank_metrics(list(accs.values()), [truth[c] for c in accs], n_boot=0)
    return probe


# ---------------------------------------------------------------- files

def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def read_challenge(path: Path) -> dict[str, str]:
    """{name: code} from a challenge-format file; ValueError naming the file or the entry."""
    try:
        entries = json.loads(Path(path).read_text())
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}")
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON: {e}")
    if not isinstance(entries, dict) or not entries:
        raise ValueError(f"{path} must hold a non-empty object of {{name: {{\"arch\": code, \"acc\": ...}}}}")
    codes = {}
    for name, entry in entries.items():
        code = entry.get("arch") if isinstance(entry, dict) else None
        if not isinstance(code, str):
            raise ValueError(f"{path}: entry {name!r} has no \"arch\" string")
        try:
            codes[name] = sn.encode(sn.decode(code))
        except ValueError as e:
            raise ValueError(f"{path}: entry {name!r}: {e}")
    return codes


def write_challenge(path: Path, codes: dict[str, str], accs: dict[str, float]) -> None:
    """The same format with `acc` filled in: a submission."""
    write_json_atomic(Path(path), {name: {"acc": accs[code], "arch": code} for name, code in codes.items()})


def format_metric(m: dict, name: str) -> str:
    ci = m.get(f"{name}_ci")
    return f"{m[name]:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{m[name]:.3f}"


def write_report(run_dir: Path, config: dict, results: dict) -> Path:
    """`report.md`: stages, rank metrics with intervals next to the noise ceiling, best archs,
    and supernet accuracy against ground truth as a text table."""
    m, ceiling = results["metrics"], results.get("noise_ceiling")
    lines = [f"# Run {run_dir.name}", "",
             f"Preset `{config['preset']['name']}` ({config['preset']['dataset']}), stages "
             f"{' → '.join(config['stages'])}, APS {config['aps']}, KD {'on' if config['kd'] else 'off'}, "
             f"seed {config['seed']}.", "",
             "## Rank consistency", "",
             f"| metric | supernet vs ground truth (n = {m['n']}) | noise ceiling: seed vs seed (n = "
             f"{ceiling['n'] if ceiling else 0}) |", "|---|---|---|"]
    for name in METRICS:
        lines.append(f"| {name} | {format_metric(m, name)} | {format_metric(ceiling, name) if ceiling else 'n/a'} |")
    for floor in ("flops", "params"):
        if floor in results:
            f = results[floor]
            lines.append(f"| {floor} as the ranking: kendall | {format_metric(f, 'kendall')} | |")
    lines += ["", "95% bootstrap intervals in brackets.", "", "## Best archs by supernet accuracy", "",
              "| arch | supernet | ground truth |", "|---|---|---|"]
    rows = sorted(results["archs"], key=lambda r: -r["supernet"])
    for r in rows[:10]:
        lines.append(f"| `{r['arch']}` | {r['supernet']:.4f} | {r['truth']:.4f} |")
    lines += ["", "## Supernet accuracy against ground truth", "", "```",
              f"{'rank gt':>7} {'rank sn':>7} {'ground truth':>12} {'supernet':>9}"]
    by_truth = sorted(rows, key=lambda r: -r["truth"])
    sn_rank = {r["arch"]: i + 1 for i, r in enumerate(rows)}
    for i, r in enumerate(by_truth):
        lines.append(f"{i + 1:>7} {sn_rank[r['arch']]:>7} {r['truth']:>12.4f} {r['supernet']:>9.4f}")
    lines.append("```")
    path = run_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
