"""Evaluation: BN recalibration, subnet accuracy, stand-alone ground truth, rank metrics, the
challenge's JSON format, and the report.

A subnet's accuracy with inherited weights means nothing until its BN statistics are its own:
the supernet's running statistics mix every sampled arch. So every evaluation first
recalibrates BN on a fixed, seeded set of training batches (paper Sec. 3.1: 50 x 256), then
measures top-1 on the held-out split. The supernet is never copied: statistics are written
into the sliced running buffers, which the next arch's calibration overwrites again.

Errors are exceptions (ValueError for bad files, train_stages.TrainingError for training);
the command line turns them into one line and an exit code.
"""

import hashlib
import json
import math
import platform
import random
import time
import warnings
from pathlib import Path

import numpy as np
import scipy.stats
import torch
import torch.nn as nn
import torch.nn.functional as F

import parallel
import supernet
import train_stages
from data import crop_pad, mix_seed

# ---------------------------------------------------------------- BN recalibration and accuracy


def _bns(net: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]


@torch.no_grad()
def calibrate_bn(net: nn.Module, arch: supernet.Arch | None, batches: list[torch.Tensor]) -> None:
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
            with train_stages.autocast(x.device):
                net(x) if arch is None else net(x, arch)
    finally:
        for bn, m in zip(bns, momenta):
            bn.momentum = m
        net.eval()


@torch.no_grad()
def accuracy(net: nn.Module, arch: supernet.Arch | None, batches) -> float:
    """Top-1 on the held-out batches; one host sync at the end."""
    net.eval()
    correct = torch.zeros((), dtype=torch.long, device=batches[0][0].device)
    total = 0
    for x, y in batches:
        with train_stages.autocast(x.device):
            logits = net(x) if arch is None else net(x, arch)
        correct += (logits.argmax(1) == y).sum()
        total += len(y)
    return correct.item() / total


def evaluate_archs(st: train_stages.TrainState, archs: list[supernet.Arch], calib, evals,
                   progress=None) -> dict[str, float]:
    """Accuracy of each arch with inherited weights: {code: top-1}.

    When the run has sub-supernets (SSE), each arch is evaluated with the one that owns it:
    archs are grouped by owner so each sub-supernet's weights are loaded once. The net holds
    the same weights afterwards as before.
    """
    sse = st.sse_stage
    groups: dict[int | None, list[supernet.Arch]] = {}
    for a in archs:
        groups.setdefault(train_stages.sse_owner(a, sse) if sse else None, []).append(a)
    before, results, done = st.current_sub, {}, 0
    for owner, members in groups.items():
        if owner is not None:
            train_stages.swap_sub(st, owner)
        for a in members:
            calibrate_bn(st.net, a, calib)
            results[supernet.encode(a)] = accuracy(st.net, a, evals)
            done += 1
            if progress:
                progress(done, len(archs))
    if sse:
        train_stages.swap_sub(st, before)
    return {supernet.encode(a): results[supernet.encode(a)] for a in archs}


def evaluate_run(st: train_stages.TrainState, data, archs: list[supernet.Arch],
                 log) -> dict[str, float]:
    """`evaluate_archs` with the preset's calibration and held-out sets, logging progress.
    Under torchrun, rank r evaluates archs i = r (mod world size); every rank returns all."""
    preset = st.preset
    calib = data.calib_batches(preset.calib_batches, preset.calib_batch_size, seed=0)
    evals = data.eval_batches(preset.eval_subset)
    own = evaluate_archs(st, parallel.mine(archs), calib, evals,
                         lambda d, n: log("evaluate", done=d, total=n))
    accs = parallel.gather_dict(own)
    return {supernet.encode(a): accs[supernet.encode(a)] for a in archs}


# ---------------------------------------------------------------- rank metrics

def _pearson(a, b):
    return scipy.stats.pearsonr(a, b).statistic


def _kendall(a, b):
    return scipy.stats.kendalltau(a, b).statistic


def _spearman(a, b):
    return scipy.stats.spearmanr(a, b).statistic


METRICS = {"pearson": _pearson, "kendall": _kendall, "spearman": _spearman}
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
                                             rng=np.random.default_rng(seed))
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
                                         method="percentile", rng=np.random.default_rng(seed))
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


def size_floors(truth: dict[str, float], preset: train_stages.Preset) -> dict:
    """Rank metrics of FLOPs and of parameter count against the ground truth: rankings that cost
    no training, which a supernet must beat to be worth its own."""
    y = list(truth.values())
    sizes = [supernet.size_of(supernet.decode(c), preset.shape) for c in truth]
    return {"flops": rank_metrics([f for f, _ in sizes], y),
            "params": rank_metrics([p for _, p in sizes], y)}


def run_results(truth: dict, accs: dict, ceiling: dict | None, preset: train_stages.Preset) -> dict:
    """Rank metrics of the supernet and of the FLOPs/params floors against the ground truth."""
    return {"metrics": rank_metrics([accs[c] for c in truth], list(truth.values())),
            "noise_ceiling": ceiling, **size_floors(truth, preset),
            "archs": [{"arch": c, "supernet": accs[c], "truth": truth[c]} for c in truth]}


# ---------------------------------------------------------------- stand-alone ground truth

# The stand-alone recipe's fixed parts; `recipe_settings` puts them in the cache key with the rest.
GT_MOMENTUM = 0.9
GT_NESTEROV = True
GT_WEIGHT_DECAY = 5e-4
GT_SCHEDULE = "linear warm-up over 5% of the steps, then cosine to 0"
# The net evaluated is an exponential moving average of the weights (and BN buffers) whose
# window is this fraction of the steps: it smooths the last stretch of a short run, where
# one seed's last batches would otherwise move an arch's accuracy by more than archs differ.
GT_EMA_WINDOW = 0.1


def recipe_settings(preset: train_stages.Preset, device) -> dict:
    """Every setting a stand-alone accuracy depends on besides the arch and the seed.

    Float results also depend on the thread count (the order of reductions), so it is part of
    the key on CPU; on CUDA the precision is. The CPU model and library versions are not: they
    move an accuracy by rounding, which training amplifies to about the size of seed noise,
    and the 2-seed mean is what archs are ranked by.
    """
    device = torch.device(device)
    if device.type == "cpu":
        where = f"cpu fp32, {torch.get_num_threads()} threads"
    else:
        where = "cuda bf16 autocast"
    pad = crop_pad(preset.dataset, preset.image_size)
    return {"dataset": preset.dataset, "image_size": preset.image_size,
            "in_channels": preset.in_channels, "num_classes": preset.num_classes,
            "divisor": preset.divisor,
            "train_subset": preset.train_subset, "eval_subset": preset.eval_subset,
            "augment": ("random resized crop; horizontal flip" if preset.dataset == "imagenet"
                        else f"random crop, zero pad {pad} px; horizontal flip"),
            # floats as floats: 1 and 1.0 epochs must give one key
            "epochs": float(preset.gt_epochs), "batch_size": preset.gt_batch_size,
            "lr": float(preset.gt_lr), "width_mult": float(preset.width_mult),
            "schedule": GT_SCHEDULE, "momentum": GT_MOMENTUM, "nesterov": GT_NESTEROV,
            "weight_decay": GT_WEIGHT_DECAY, "label_smoothing": preset.gt_label_smoothing,
            "ema_window": GT_EMA_WINDOW, "device": where}


def recipe(preset: train_stages.Preset, device) -> str:
    """The cache key of the stand-alone recipe: a hash of `recipe_settings`."""
    settings = json.dumps(recipe_settings(preset, device), sort_keys=True)
    return "gt-" + hashlib.sha1(settings.encode()).hexdigest()[:10]


def train_standalone(arch: supernet.Arch, preset: train_stages.Preset, data, seed: int,
                     progress=None) -> float:
    """Train `arch` from scratch as a static net with the preset's recipe; held-out top-1."""
    torch.manual_seed(seed)
    net = supernet.StaticNet(arch, preset.shape).to(data.device)
    return train_static(net, preset, data, seed, preset.gt_epochs, progress=progress)


def train_static(net: nn.Module, preset: train_stages.Preset, data, seed: int, epochs: float,
                 checkpoint: Path | None = None, progress=None, what: str = "") -> float:
    """Train a static net with the stand-alone recipe for `epochs`; held-out top-1.

    SGD with Nesterov momentum and weight decay, the schedule of every phase (linear warm-up,
    then cosine to 0), the supernet's augmentation, optional label smoothing; the accuracy is
    that of an exponential moving average of the weights (`GT_EMA_WINDOW`). The batches
    depend only on the seed, so every arch of one seed sees the same images in the same order,
    and archs differ only by what they are. With `checkpoint`, the net, optimizer and step
    are saved there every `preset.checkpoint_every` steps with `what` (the arch, the run; the
    seed and epochs are added), and a later call with the same resumes from it; ValueError
    when the file belongs to another training. `progress(step, steps)` is called about 20
    times along the way.
    """
    device = data.device
    if device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=preset.gt_lr, momentum=GT_MOMENTUM,
                          nesterov=GT_NESTEROV, weight_decay=GT_WEIGHT_DECAY)
    steps = max(1, round(epochs * data.train_size / preset.gt_batch_size))
    decay = 1 - 1 / max(1.0, GT_EMA_WINDOW * steps)
    ema = torch.optim.swa_utils.AveragedModel(
        net, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(decay), use_buffers=True)
    key = mix_seed(seed, 0x67)
    start = 0
    identity = f"{what}, seed {seed}, {epochs:g} epochs"
    if checkpoint is not None and checkpoint.exists():
        blob = torch.load(checkpoint, map_location=device, weights_only=True)
        if blob.get("identity") != identity:
            raise ValueError(f"{checkpoint} holds another training ({blob.get('identity')}); "
                             "delete it or choose another --out")
        net.load_state_dict(blob["net"])
        opt.load_state_dict(blob["optimizer"])
        ema.load_state_dict(blob["ema"])
        start = blob["step"]
    net.train()
    loss = torch.zeros(())
    for step in range(start, steps):
        for g in opt.param_groups:
            g["lr"] = train_stages.lr_at(step, steps, preset.gt_lr)
        x, y = data.train_batch(key, step, preset.gt_batch_size)
        with train_stages.autocast(device):
            loss = F.cross_entropy(net(x), y, label_smoothing=preset.gt_label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update_parameters(net)
        if progress and ((step + 1) % max(1, steps // 20) == 0 or step + 1 == steps):
            progress(step + 1, steps)
        if checkpoint is not None and (step + 1) % preset.checkpoint_every == 0:
            state = {"net": net.state_dict(), "optimizer": opt.state_dict(),
                     "ema": ema.state_dict(), "step": step + 1, "identity": identity}
            train_stages.replace_atomically(checkpoint, lambda tmp: torch.save(state, tmp))
    if not math.isfinite(loss.item()):
        code = supernet.encode(net.arch) if hasattr(net, "arch") else "a static net"
        raise train_stages.TrainingError(f"non-finite loss training {code} stand-alone "
                                         f"(seed {seed})")
    net.load_state_dict(ema.module.state_dict())  # the averaged weights are the result
    return accuracy(net, None, data.eval_batches(preset.eval_subset))


def pick_archs(n: int, seed: int, preset: train_stages.Preset,
               stratified: bool = False) -> list[supernet.Arch]:
    """n distinct archs drawn with `seed`.

    Uniform over the challenge space by default, as the challenge's own candidate codes are;
    the first k archs of n are those of n = k, so a larger sample extends a smaller one.
    `stratified` takes one arch per equal FLOPs stratum of 10n uniform samples instead: it
    widens the spread of accuracies and so inflates every correlation, FLOPs' included, which
    is why it is an option and never the headline sample.
    """
    rng = random.Random(seed)
    if not stratified:
        archs: dict[supernet.Arch, None] = {}
        while len(archs) < n:
            archs[supernet.sample_arch(rng)] = None
        return list(archs)
    pool = list(dict.fromkeys(supernet.sample_arch(rng) for _ in range(10 * n)))
    pool.sort(key=lambda a: supernet.size_of(a, preset.shape)[0])
    edges = np.linspace(0, len(pool), n + 1).astype(int)
    return [pool[rng.randrange(lo, hi)] for lo, hi in zip(edges[:-1], edges[1:])]


# Stand-alone accuracies committed with the repository (bench/results/groundtruth.json): a
# run whose recipe matches takes its entries from there instead of training them again.
SHARED_GROUND_TRUTH = Path(__file__).resolve().parent / "bench" / "results" / "groundtruth.json"


def _read_entries(path: Path) -> dict[str, dict]:
    try:
        entries = json.loads(path.read_text())["entries"]
        return {GroundTruth.key(**{k: e[k] for k in GroundTruth.FIELDS}): e for e in entries}
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a ground-truth file ({type(e).__name__}: {e})")


class GroundTruth:
    """`groundtruth.json`: stand-alone accuracies keyed by arch, dataset, recipe and seed.

    Written atomically after every net, so an interrupted job continues where it stopped and
    nothing is trained twice. Entries missing here are taken from `shared` (a read-only file of
    the same format) when it holds them, and copied here, so a run folder stays complete.
    Under torchrun, rank r > 0 writes its own `<name>.rank<r>.json` beside the file, so no two
    processes ever write one file; `merge_ranks` folds them into the file at the end, and a
    killed job's rank files are read back by the next one."""

    FIELDS = ("arch", "dataset", "recipe", "seed")

    def __init__(self, path: Path, shared: Path | None = None):
        self.main_path = path
        self.path = path if parallel.is_main() else self.rank_file(parallel.rank())
        self.entries = {}
        for source in [path, *self.rank_files()]:
            if source.exists():
                self.entries.update(_read_entries(source))
        self.shared = {}
        if shared is not None and shared.exists() and shared.resolve() != path.resolve():
            self.shared = _read_entries(shared)

    @staticmethod
    def key(arch: str, dataset: str, recipe: str, seed: int) -> str:
        return f"{arch}|{dataset}|{recipe}|{seed}"

    def get(self, arch: str, dataset: str, recipe: str, seed: int) -> float | None:
        k = self.key(arch, dataset, recipe, seed)
        if k not in self.entries and k in self.shared:
            self.entries[k] = self.shared[k]
            write_json_atomic(self.path, {"entries": list(self.entries.values())})
        e = self.entries.get(k)
        return None if e is None else e["acc"]

    def put(self, arch: str, dataset: str, recipe: str, seed: int, acc: float,
            seconds: float) -> None:
        self.entries[self.key(arch, dataset, recipe, seed)] = {
            "arch": arch, "dataset": dataset, "recipe": recipe, "seed": seed, "acc": acc,
            "seconds": seconds}
        write_json_atomic(self.path, {"entries": list(self.entries.values())})

    def rank_file(self, rank: int) -> Path:
        return self.main_path.with_name(f"{self.main_path.stem}.rank{rank}.json")

    def rank_files(self) -> list[Path]:
        return sorted(self.main_path.parent.glob(f"{self.main_path.stem}.rank*.json"))

    def merge_ranks(self) -> None:
        """Every rank's entries into the one file, written by rank 0; the rank files go. A
        collective call: every rank makes it once its own nets are done."""
        self.entries.update(parallel.gather_dict(self.entries))
        if parallel.world_size() > 1 and parallel.is_main():
            write_json_atomic(self.path, {"entries": list(self.entries.values())})
            for part in self.rank_files():
                part.unlink()

    def accs(self, dataset: str, recipe: str, seed: int) -> dict[str, float]:
        return {e["arch"]: e["acc"] for e in self.entries.values()
                if e["dataset"] == dataset and e["recipe"] == recipe and e["seed"] == seed}


def ground_truth(gt: GroundTruth, archs: list[supernet.Arch], seeds: int,
                 preset: train_stages.Preset, data, log) -> tuple[dict[str, float], dict | None]:
    """Train what is not cached yet, every arch with seeds 0..seeds-1 (one arch after the
    other, its seeds together); return {code: mean top-1 over the seeds} and, with 2 seeds,
    the noise ceiling (`noise_ceiling`). Under torchrun, rank r trains archs i = r (mod world
    size) and every rank returns the whole."""
    r = recipe(preset, data.device)
    jobs = [(a, seed) for a in parallel.mine(archs) for seed in range(seeds)]
    for i, (a, seed) in enumerate(jobs):
        code = supernet.encode(a)
        acc = gt.get(code, preset.dataset, r, seed)
        seconds = None
        if acc is None:
            t = time.perf_counter()
            acc = train_standalone(a, preset, data, seed, lambda step, steps: log(
                "groundtruth_step", arch=code, seed=seed, step=step, steps=steps,
                done=i, total=len(jobs)))
            seconds = time.perf_counter() - t
            gt.put(code, preset.dataset, r, seed, acc, seconds)
        log("groundtruth", done=i + 1, total=len(jobs), arch=code, acc=acc, seed=seed,
            seconds=seconds, flops=supernet.size_of(a, preset.shape)[0])
    gt.merge_ranks()
    codes = [supernet.encode(a) for a in archs]
    per_seed = [{c: gt.get(c, preset.dataset, r, seed) for c in codes} for seed in range(seeds)]
    truth = {c: sum(s[c] for s in per_seed) / seeds for c in codes}
    return truth, noise_ceiling(per_seed) if seeds == 2 else None


def noise_ceiling(per_seed: list[dict[str, float]]) -> dict | None:
    """How far any predictor can agree with the 2-seed mean: {"seed_vs_seed": R, "ceiling": ...}.

    R is the rank metrics of seed 0 against seed 1 over the same archs, with intervals; it is
    not itself a ceiling (the mean of 2 seeds is less noisy than either). `ceiling_from` maps
    it to what a predictor equal to the noise-free accuracy would reach against the mean.
    None below 3 archs."""
    first, second = per_seed
    both = [c for c in first if c in second]
    if len(both) < 3:
        return None
    r = rank_metrics([first[c] for c in both], [second[c] for c in both])
    return {"seed_vs_seed": r, "ceiling": ceiling_from(r)}


def build_ground_truth(run_dir: Path, preset: train_stages.Preset, data, log, n: int, seeds: int,
                       seed: int, stratified: bool = False) -> tuple[dict[str, float], dict | None]:
    """The ground truth of a run folder: n archs picked with `seed`, each trained with `seeds`
    seeds; trains what its groundtruth.json and the committed one lack. ValueError for a
    damaged file."""
    gt = GroundTruth(run_dir / "groundtruth.json", SHARED_GROUND_TRUTH)
    archs = pick_archs(n, seed, preset, stratified)
    truth, ceiling = ground_truth(gt, archs, seeds, preset, data, log)
    if ceiling:
        top = ceiling["ceiling"]
        log("noise_ceiling", **{k: top[k] for k in ("pearson", "kendall", "spearman", "n")},
            seed_vs_seed={k: ceiling["seed_vs_seed"][k] for k in METRICS})
    return truth, ceiling


def stored_ground_truth(run_dir: Path, preset: train_stages.Preset, device):
    """(truth, noise ceiling) from a run's groundtruth.json without training anything: the
    archs trained with seed 0, averaged with seed 1 where every one of them has it."""
    gt = GroundTruth(run_dir / "groundtruth.json")
    r = recipe(preset, device)
    first, second = gt.accs(preset.dataset, r, 0), gt.accs(preset.dataset, r, 1)
    if not first or any(c not in second for c in first):
        return first, None
    per_seed = [first, {c: second[c] for c in first}]
    return {c: (first[c] + second[c]) / 2 for c in first}, noise_ceiling(per_seed)


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


def ceiling_of(value: float, name: str) -> float:
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


def ceiling_from(seed_vs_seed: dict) -> dict:
    """`ceiling_of` every metric of a seed-vs-seed result, its interval mapped end by end (the
    map is increasing, so a percentile interval stays one)."""
    out = {"n": seed_vs_seed["n"]}
    for name in METRICS:
        out[name] = ceiling_of(seed_vs_seed[name], name)
        if f"{name}_ci" in seed_vs_seed:
            out[f"{name}_ci"] = [ceiling_of(v, name) for v in seed_vs_seed[f"{name}_ci"]]
    return out


# ---------------------------------------------------------------- probes during training

def make_probe(preset: train_stages.Preset, data, truth: dict[str, float]):
    """A cheap running rank correlation for the training loop: the ground-truth archs with a
    smaller calibration set and eval subset, no bootstrap."""
    archs = [supernet.decode(c) for c in truth]
    calib = data.calib_batches(preset.probe_calib_batches, preset.calib_batch_size, seed=1)
    evals = data.eval_batches(preset.probe_eval_images)

    def probe(st: train_stages.TrainState) -> dict | None:
        accs = evaluate_archs(st, archs, calib, evals)
        metrics = rank_metrics(list(accs.values()), [truth[c] for c in accs], n_boot=0)
        return {**metrics, "points": scatter_points(accs, truth)}
    return probe


def scatter_points(accs: dict[str, float], truth: dict[str, float]) -> list[list[float]]:
    """[supernet top-1, ground truth] per arch: what the UI's scatter plots."""
    return [[accs[c], truth[c]] for c in truth if c in accs]


def make_scorer(preset: train_stages.Preset, data):
    """`score(net)`: top-1 of a static net after exact BN recalibration, on the probe's
    calibration and held-out sets (the training loop's way to compare two nets)."""
    calib = data.calib_batches(preset.probe_calib_batches, preset.calib_batch_size, seed=1)
    evals = data.eval_batches(preset.probe_eval_images)

    def score(net: nn.Module) -> float:
        calibrate_bn(net, None, calib)
        return accuracy(net, None, evals)
    return score


# ---------------------------------------------------------------- files

def write_json_atomic(path: Path, obj) -> None:
    train_stages.replace_atomically(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=1)))


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


def machine_name(device) -> str:
    """The GPU's name, or the CPU's model as /proc/cpuinfo gives it: for tables of results."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    try:  # platform.processor() is empty on most Linux machines
        with open("/proc/cpuinfo") as f:
            names = (line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
            return next(names)
    except (OSError, StopIteration):
        return platform.processor() or "cpu"


def format_metric(m: dict, name: str) -> str:
    ci = m.get(f"{name}_ci")
    return f"{m[name]:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{m[name]:.3f}"


CEILING_NOTE = (
    "The ground truth is the mean of 2 seeds. Seed 0 against seed 1 (R) is the agreement of two "
    "equally noisy measurements, not a ceiling: the ceiling is what a predictor equal to the "
    "noise-free accuracy would reach against the 2-seed mean, sqrt(2R / (1 + R)) for Pearson "
    "(the Spearman-Brown reliability of a mean of 2), with Kendall and Spearman mapped through "
    "their normal-copula relations to Pearson (tau = 2/pi asin r, rho = 6/pi asin(r/2)).")


def write_scatter(path: Path, results: dict, preset: train_stages.Preset) -> Path:
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
             ylabel="ground truth top-1 (stand-alone)",
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
    preset = train_stages.preset_from_config(config)
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
