"""The presets, and the little that training, evaluation and search all need: the device and
its precision, the learning-rate schedule, BN momentum, atomic writes, and the errors.

A preset is everything a run's numbers depend on. Every stage's epochs and learning rates are
the paper's (train_stages.SCHEDULE), multiplied by the preset's `epoch_scale` and `lr_scale`, so
the ratios between phases stay the paper's; the full-net warm-up and the stand-alone ground-truth
recipe have no paper counterpart and are the preset's own.
"""

import json
import math
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn

import parallel
import supernet


@dataclass(frozen=True)
class Preset:
    """Everything a run's numbers depend on."""

    name: str
    dataset: str                  # fashion-mnist | cifar10 | cifar100 | imagenet
    image_size: int               # images are resized to this (Fashion-MNIST is 28 px, CIFAR 32)
    in_channels: int
    num_classes: int
    width_mult: float
    divisor: int
    batch_size: int
    epoch_scale: float            # one paper epoch = this many epochs of our training set
    lr_scale: float               # paper lrs (0.001..0.004, fine-tuning a pretrained net) x this
    warmup_epochs: float          # full-net warm-up, in our epochs (no paper counterpart)
    warmup_lr: float
    train_subset: int = 0         # 0: the whole training split
    eval_subset: int = 0          # held-out images per subnet evaluation (0: all)
    calib_batches: int = 50       # BN recalibration: batches x batch size (paper: 50 x 256)
    calib_batch_size: int = 256
    gt_epochs: float = 10.0       # stand-alone ground-truth recipe
    gt_lr: float = 0.1
    gt_batch_size: int = 256
    gt_label_smoothing: float = 0.0
    gt_n: int = 50                # ground-truth archs
    gt_seeds: int = 2             # seeds per arch: the ground truth is their mean
    gt_reading: str = "acc"       # what of a net is its truth: report.READINGS
    probe_every: int = 200        # steps between running rank probes (0: phase ends only)
    probe_calib_batches: int = 4
    probe_eval_images: int = 1000
    log_every: int = 20
    checkpoint_every: int = 500
    queue_size: int = 49152       # Π-NAS negatives (its code's; small datasets need fewer)
    cpu_threads: int = 0          # torch threads on CPU (0: torch's default); results depend on it
    gt_processes: int = 1         # on a GPU: stand-alone nets trained side by side (torchrun)
    candidates: str = ""          # a challenge-format file of archs that CPT and SSE walk (a
                                  # path, relative to the repository or absolute); "": uniform

    @property
    def shape(self) -> supernet.NetShape:
        return supernet.NetShape(self.image_size, self.in_channels, self.num_classes,
                                 self.width_mult, self.divisor)


# CPU smoke run on a Fashion-MNIST subset: every stage runs, a paper epoch is about one step.
# Its 16 stand-alone nets are committed (bench/results/groundtruth.json) under 2 threads, pinned
# so that their key matches on any CPU: a first run trains only the supernet.
TINY = Preset(
    name="tiny", dataset="fashion-mnist", image_size=28, in_channels=1, num_classes=10,
    width_mult=0.125, divisor=2, batch_size=64, epoch_scale=0.008, lr_scale=10,
    warmup_epochs=1, warmup_lr=0.1, train_subset=5000, eval_subset=1000,
    calib_batches=4, calib_batch_size=128,
    gt_epochs=1.5, gt_lr=0.1, gt_batch_size=64, gt_n=8,
    probe_every=0, probe_calib_batches=2, probe_eval_images=500, log_every=5,
    checkpoint_every=50, queue_size=1024, cpu_threads=2)

# Rank evidence on 2 CPU cores: all 60,000 Fashion-MNIST training images at 14 px (2 x 2
# averaged), all 10,000 held out, every ground-truth arch trained with 2 seeds. The stand-alone
# recipe is the best of the pilot on archs apart from the headline ones (bench/gt_recipe.py,
# BENCHMARKS "the recipe chosen"): 12 epochs of all 60,000 images (720,000 image passes a net),
# the truth minus the held-out cross-entropy, which the seeds agree on most (Kendall 0.52 on
# archs spread by FLOPs; FLOPs rank it positively, +0.24: it ranks capacity, where 6 epochs of
# 10,000 images ranked speed of training). The supernet trains on the same 60,000 images: a
# paper epoch is 0.04 of them (9 steps), a 4-epoch warm-up of the full net, 2,156 steps in all
# (warm-up 938; APS depth 282 and width 375 at K = 4 paths; CPT 281 and SSE34 280 at 1 + 10
# pool paths, SSE's with the teacher's forward too): about 9,700 path passes, 2.5 M image
# passes, 3.5 times one stand-alone net's 0.72 M, 1/23 of its 80-net ground truth's. The
# budget is what keeps `all` within 30 minutes on 2 CPU cores (BENCHMARKS: 26.7 minutes, 24.7
# of them training; at 0.05 the training alone took 25.5 minutes without the rank probes).
SMALL = Preset(
    name="small", dataset="fashion-mnist", image_size=14, in_channels=1, num_classes=10,
    width_mult=0.125, divisor=2, batch_size=256, epoch_scale=0.04, lr_scale=10,
    warmup_epochs=4, warmup_lr=0.1, train_subset=0,
    calib_batches=10, calib_batch_size=256,
    gt_epochs=12, gt_lr=0.1, gt_batch_size=256, gt_label_smoothing=0.1, gt_n=40,
    gt_reading="ce", probe_every=0, probe_calib_batches=2, probe_eval_images=2000, log_every=10,
    checkpoint_every=200, queue_size=4096, cpu_threads=2)

# One GPU, about an hour: CIFAR-10 at half width, a paper epoch is a quarter of CIFAR.
CIFAR = Preset(
    name="cifar", dataset="cifar10", image_size=32, in_channels=3, num_classes=10,
    width_mult=0.5, divisor=4, batch_size=256, epoch_scale=0.25, lr_scale=10,
    warmup_epochs=15, warmup_lr=0.2, eval_subset=10000,
    calib_batches=8, calib_batch_size=250, gt_epochs=8, gt_lr=0.2, gt_n=50,
    probe_every=200, probe_calib_batches=4, probe_eval_images=2000, queue_size=4096)

# Seconds on a CPU: every stage a step or two, 4 ground-truth archs x 2 seeds of a few steps;
# for tests and the dry run of bench/gpu_check.sh. Its numbers mean nothing. 14 px, as `gpu`
# and `small`: the dry run emulates the CUDA path (bf16 autocast), and bf16 convolutions on a
# CPU without native bf16 (AVX2) are 13 times slower than fp32 ones; at 28 px `all` took 93 s
# there, at 14 px 35 s (2 AMD EPYC cores, 2026-12-05).
SMOKE = Preset(
    name="smoke", dataset="fashion-mnist", image_size=14, in_channels=1, num_classes=10,
    width_mult=0.125, divisor=2, batch_size=32, epoch_scale=0.006, lr_scale=10,
    warmup_epochs=0.0625, warmup_lr=0.1, train_subset=512, eval_subset=128,
    calib_batches=1, calib_batch_size=64, gt_epochs=0.125, gt_lr=0.05, gt_batch_size=32,
    gt_n=4, probe_every=0, probe_calib_batches=1, probe_eval_images=128, log_every=2,
    checkpoint_every=50, queue_size=128)

# The whole experiment in one sitting on one H100/H200 (a lent GPU has 15 minutes in all;
# `all` is meant for <= 6): all 60,000 Fashion-MNIST images from --data-dir at 14 px, and the
# stand-alone recipe measured on the CPU to rank capacity (bench/gt_recipe.py, 2026-12-03: 12
# epochs of all 60,000 images, the truth the held-out cross-entropy, which the seeds agree on,
# Kendall 0.52 on archs spread by FLOPs, FLOPs against it +0.24), for 50 archs x 2 seeds, 8 of
# them side by side (gt_processes: torchrun processes sharing the card; these nets are too
# small to fill it one at a time).
# Cost model (README "The gpu preset"): these nets are launch-bound, not FLOP-bound. A step of
# a mid-sized arch is about 400 kernels (23 blocks at most, ~24 ops each forward and
# backward, plus SGD and the EMA); at ~10 us of eager dispatch each that is ~4 ms whatever the
# FLOPs (a 14 px, x0.125 net is ~6 MFLOPs an image: 256 images x 3 x 6 MFLOPs = 5 GFLOPs a
# step, under 1 ms on an H100). 12 epochs are 2,812 steps: ~11 s a net, 100 nets ~19 min in
# one process, ~2.5 min in 8 if the card interleaves their kernels. The supernet: ~3,000
# steps of K = 4 to 11 paths, ~3.5 ms a path: ~80 s; evaluation and the search ~20 s.
GPU = Preset(
    name="gpu", dataset="fashion-mnist", image_size=14, in_channels=1, num_classes=10,
    width_mult=0.125, divisor=2, batch_size=256, epoch_scale=0.1, lr_scale=10,
    warmup_epochs=4, warmup_lr=0.1, calib_batches=10, calib_batch_size=256,
    gt_epochs=12, gt_lr=0.1, gt_batch_size=256, gt_label_smoothing=0.1, gt_n=50, gt_reading="ce",
    probe_every=0, probe_calib_batches=2, probe_eval_images=2000, log_every=50,
    checkpoint_every=1000, queue_size=4096, gt_processes=8)

PRESETS = {
    "smoke": SMOKE,
    "tiny": TINY,
    "small": SMALL,
    "gpu": GPU,
    "cifar": CIFAR,
    # cifar's budget on Fashion-MNIST (60,000 images), for GPU machines that cannot download
    # CIFAR: carry the four .gz files and pass --data-dir.
    "fashion": replace(CIFAR, name="fashion", dataset="fashion-mnist", image_size=28,
                       in_channels=1),
    # The paper's schedule on ImageNet (the warm-up and the ground-truth recipe are ours); CPT
    # and SSE walk the challenge's 45,000 candidates, as OPPO's code does. With --init (the
    # challenge's pretrained ResNet-48) the warm-up is skipped, as in OPPO's run.
    "paper": Preset(
        name="paper", dataset="imagenet", image_size=224, in_channels=3, num_classes=1000,
        width_mult=1.0, divisor=8, batch_size=256, epoch_scale=1.0, lr_scale=1.0,
        warmup_epochs=90, warmup_lr=0.1, eval_subset=50000, gt_epochs=90, gt_lr=0.1, gt_n=50,
        probe_every=2000, probe_eval_images=5000, checkpoint_every=2000,
        candidates="archs/CVPR_2022_NAS_Track1_test.json.gz"),
}


class TrainingError(Exception):
    """Training cannot go on (a non-finite loss, a refused checkpoint); the message says where."""


# ---------------------------------------------------------------- what a run's config is

def run_config(preset: Preset, stages, seed: int, aps: str, kd: bool,
               init: dict | None = None) -> dict:
    """What a run's results depend on: config.json, and the key a checkpoint must match.
    `init` ({"path", "sha256"} of the net the run starts from) only where there is one, so
    that a run without it has the config it always had."""
    config = {"preset": asdict(preset), "stages": list(stages), "seed": seed, "aps": aps,
              "kd": kd}
    return {**config, "init": init} if init else config


def config_diff(a: dict, b: dict) -> list[str]:
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def preset_from_config(config: dict) -> Preset:
    """The run's preset; TrainingError for a config.json written by another version."""
    try:
        return Preset(**config["preset"])
    except (TypeError, KeyError) as e:
        raise TrainingError(f"config.json was written by another version of nas.py ({e}); "
                            "start a new run")


# ---------------------------------------------------------------- device, precision, threads

def set_threads(preset: Preset) -> None:
    """Pin torch's CPU threads where the preset says so: float results depend on the count.
    Processes that torchrun started on one machine share the preset's threads."""
    if preset.cpu_threads:
        torch.set_num_threads(parallel.threads_per_rank(preset.cpu_threads))


def pick_device(name: str) -> str:
    """'auto', 'cpu' or 'cuda' as the device to train on; ValueError when it is not here."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda") or (name == "cuda" and not torch.cuda.is_available()):
        raise ValueError(f"device {name!r} is not available here; use cpu, cuda or auto")
    return name


# Test-only: the GPU's precision and memory layout on the CPU (bf16 autocast, channels_last),
# so that a dtype or layout mistake of the CUDA path shows on a machine without a GPU.
CUDA_PATH_ON_CPU = os.environ.get("NAS_CUDA_PATH_ON_CPU") == "1"


def amp_dtype(device) -> torch.dtype | None:
    """What autocast computes in: bf16 on a GPU that has it; None (fp32) on one that has not
    (pre-Ampere cards: fp16 would need a gradient scaler in every step, fp32 is only slower)
    and on the CPU, unless NAS_CUDA_PATH_ON_CPU=1."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if CUDA_PATH_ON_CPU else None


def channels_last(device) -> bool:
    """Whether nets and batches use the channels_last layout (what cuDNN's convs want)."""
    return torch.device(device).type == "cuda" or CUDA_PATH_ON_CPU


def autocast(device):
    """Mixed precision as `amp_dtype` says; a no-op context where it says fp32."""
    device = torch.device(device)
    dtype = amp_dtype(device)
    return torch.autocast(device.type, dtype or torch.float32, enabled=dtype is not None)


def precision_name(device) -> str:
    """"bf16 autocast" or "fp32", for the ground truth's recipe key and tables."""
    return "bf16 autocast" if amp_dtype(device) == torch.bfloat16 else "fp32"


def lr_at(step: int, steps: int, base: float) -> float:
    """Every phase's schedule: linear warm-up over the first 5% of it, then cosine to 0."""
    warm = max(1, steps // 20)
    if step < warm:
        return base * (step + 1) / warm
    return base * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


@contextmanager
def bn_momentum(net: nn.Module, momentum: float | None = None):
    """Every BN layer of `net` with `momentum` (None: as it is, for the body to set per batch),
    the momenta as they were afterwards; yields the BN layers. BN's running update is
    r <- (1 - m) r + m b: momentum 0 keeps the running statistics, 1 / (i + 1) at batch i
    makes them the exact mean of the batches' statistics."""
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    before = [bn.momentum for bn in bns]
    try:
        if momentum is not None:
            for bn in bns:
                bn.momentum = momentum
        yield bns
    finally:
        for bn, m in zip(bns, before):
            bn.momentum = m


# ---------------------------------------------------------------- files

def replace_atomically(path: Path, write) -> None:
    """`write(tmp)` then rename tmp over `path`: a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj) -> None:
    replace_atomically(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=1)))
