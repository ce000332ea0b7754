"""The stand-alone ground truth: each arch trained from scratch, twice, with a fixed recipe.

A supernet is judged by how well the accuracy a subnet shows with inherited weights ranks
archs as training each one alone would. That "alone" is this module: `train_standalone`
trains an arch's static net from scratch with the preset's recipe, and `GroundTruth` caches
every net under a hash of everything its accuracy depends on (`recipe_key`), in a run's
`groundtruth.json` and in the committed bench/results/groundtruth.json, so that no net is ever
trained twice. The truth of an arch is the mean of 2 seeds; their agreement gives the noise
ceiling (report.noise_ceiling).
"""

import hashlib
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import parallel
import supernet
from data import crop_pad, mix_seed
from evaluate import heldout_metrics
from presets import (Preset, TrainingError, autocast, channels_last, lr_at, precision_name,
                     replace_atomically, write_json_atomic)
from report import METRICS, READINGS, noise_ceiling

# ---------------------------------------------------------------- the recipe

# The stand-alone recipe's fixed parts; `recipe_settings` puts them in the cache key with the rest.
GT_MOMENTUM = 0.9
GT_NESTEROV = True
GT_WEIGHT_DECAY = 5e-4
GT_SCHEDULE = "linear warm-up over 5% of the steps, then cosine to 0"
# The net evaluated is an exponential moving average of the weights (and BN buffers) whose
# window is this fraction of the steps: it smooths the last stretch of a short run, where
# one seed's last batches would otherwise move an arch's accuracy by more than archs differ.
GT_EMA_WINDOW = 0.1


def reading_of(entry: dict, reading: str) -> float | None:
    """An entry's value of `reading`, None where the net was trained before it was measured."""
    value = entry.get(reading)
    return None if value is None else READINGS[reading][1] * value


def recipe_settings(preset: Preset, device) -> dict:
    """Every setting a stand-alone accuracy depends on besides the arch and the seed.

    Float results also depend on the thread count (the order of reductions), so it is part of
    the key on CPU; on CUDA the precision is. The CPU model and library versions are not: they
    move an accuracy by rounding, which training amplifies to about the size of seed noise,
    and the 2-seed mean is what archs are ranked by.
    """
    device = torch.device(device)
    if device.type == "cpu":
        where = f"cpu {precision_name(device)}, {torch.get_num_threads()} threads"
    else:
        where = f"cuda {precision_name(device)}"
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


def recipe_key(preset: Preset, device) -> str:
    """The cache key of the stand-alone recipe: a hash of `recipe_settings`."""
    settings = json.dumps(recipe_settings(preset, device), sort_keys=True)
    return "gt-" + hashlib.sha1(settings.encode()).hexdigest()[:10]


def train_standalone(arch: supernet.Arch, preset: Preset, data, seed: int,
                     progress=None) -> dict:
    """Train `arch` from scratch as a static net with the preset's recipe; `heldout_metrics`."""
    torch.manual_seed(seed)
    net = supernet.StaticNet(arch, preset.shape).to(data.device)
    return train_static(net, preset, data, seed, preset.gt_epochs, progress=progress)


def train_static(net: nn.Module, preset: Preset, data, seed: int, epochs: float,
                 checkpoint: Path | None = None, progress=None, what: str = "") -> dict:
    """Train a static net with the stand-alone recipe for `epochs`; its `heldout_metrics`.

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
    if channels_last(device):
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
            g["lr"] = lr_at(step, steps, preset.gt_lr)
        x, y = data.train_batch(key, step, preset.gt_batch_size)
        with autocast(device):
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
            replace_atomically(checkpoint, lambda tmp: torch.save(state, tmp))
    if not math.isfinite(loss.item()):
        code = supernet.encode(net.arch) if hasattr(net, "arch") else "a static net"
        raise TrainingError(f"non-finite loss training {code} stand-alone "
                                         f"(seed {seed})")
    net.load_state_dict(ema.module.state_dict())  # the averaged weights are the result
    return heldout_metrics(net, data.eval_batches(preset.eval_subset))


def pick_archs(n: int, seed: int, preset: Preset,
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

    def get(self, arch: str, dataset: str, recipe: str, seed: int,
            reading: str = "acc") -> float | None:
        """The net's `reading` (READINGS), None when it is not here or lacks that reading."""
        k = self.key(arch, dataset, recipe, seed)
        if k not in self.entries and k in self.shared:
            self.entries[k] = self.shared[k]
            write_json_atomic(self.path, {"entries": list(self.entries.values())})
        e = self.entries.get(k)
        return None if e is None else reading_of(e, reading)

    def put(self, arch: str, dataset: str, recipe: str, seed: int, metrics: dict,
            seconds: float) -> None:
        """Store one net: `metrics` holds its top-1 as "acc" and whatever else was measured."""
        self.entries[self.key(arch, dataset, recipe, seed)] = {
            "arch": arch, "dataset": dataset, "recipe": recipe, "seed": seed, **metrics,
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

    def accs(self, dataset: str, recipe: str, seed: int, reading: str = "acc") -> dict[str, float]:
        """{arch: reading} of every net of one recipe and seed that has that reading."""
        return {e["arch"]: reading_of(e, reading) for e in self.entries.values()
                if e["dataset"] == dataset and e["recipe"] == recipe and e["seed"] == seed
                and reading in e}


def ground_truth(gt: GroundTruth, archs: list[supernet.Arch], seeds: int,
                 preset: Preset, data, log) -> tuple[dict[str, float], dict | None]:
    """Train what is not cached yet, every arch with seeds 0..seeds-1 (one arch after the
    other, its seeds together); return {code: the mean over the seeds of the preset's
    `gt_reading`} and, with 2 seeds, the noise ceiling (`noise_ceiling`). Under torchrun, rank
    r trains archs i = r (mod world size) and every rank returns the whole."""
    r = recipe_key(preset, data.device)
    jobs = [(a, seed) for a in parallel.mine(archs) for seed in range(seeds)]
    for i, (a, seed) in enumerate(jobs):
        code = supernet.encode(a)
        value = gt.get(code, preset.dataset, r, seed, preset.gt_reading)
        acc = gt.get(code, preset.dataset, r, seed)
        seconds = None
        if value is None:
            t = time.perf_counter()
            metrics = train_standalone(a, preset, data, seed, lambda step, steps: log(
                "groundtruth_step", arch=code, seed=seed, step=step, steps=steps,
                done=i, total=len(jobs)))
            seconds = time.perf_counter() - t
            gt.put(code, preset.dataset, r, seed, metrics, seconds)
            acc = metrics["acc"]
        log("groundtruth", done=i + 1, total=len(jobs), arch=code, acc=acc, seed=seed,
            seconds=seconds, flops=supernet.size_of(a, preset.shape)[0])
    gt.merge_ranks()
    codes = [supernet.encode(a) for a in archs]
    per_seed = [{c: gt.get(c, preset.dataset, r, seed, preset.gt_reading) for c in codes}
                for seed in range(seeds)]
    truth = {c: sum(s[c] for s in per_seed) / seeds for c in codes}
    return truth, noise_ceiling(per_seed) if seeds == 2 else None


def build_ground_truth(run_dir: Path, preset: Preset, data, log, n: int, seeds: int,
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


def stored_ground_truth(run_dir: Path, preset: Preset, device):
    """(truth, noise ceiling) from a run's groundtruth.json without training anything: the
    archs trained with seed 0, averaged with seed 1 where every one of them has it."""
    gt = GroundTruth(run_dir / "groundtruth.json")
    r = recipe_key(preset, device)
    first, second = (gt.accs(preset.dataset, r, seed, preset.gt_reading) for seed in (0, 1))
    if not first or any(c not in second for c in first):
        return first, None
    per_seed = [first, {c: second[c] for c in first}]
    return {c: (first[c] + second[c]) / 2 for c in first}, noise_ceiling(per_seed)
