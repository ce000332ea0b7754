"""Supernet training: the presets, the K-path step, every stage of the paper, checkpoints and the
event log.

The pipeline of "Improving the Rank Consistency of One-Shot NAS" (APS/CPT/SSE):

    warmup      train the largest net alone (the challenge handed out a pretrained ResNet-48;
                we make our own). It is also the distillation teacher of SSE.
    aps_depth   Adapted Progressive Shrinking of depth, 3 phases (Sec. 2.2, 3.2)
    aps_width   APS of width, 3 phases (Sec. 3.2)
    cpt         Candidate Plasticity Training with an NSAS constraint pool (Sec. 2.4, 3.3)
    sse34/sse4  Sub-supernet Enhancing with distillation (Sec. 2.3, 3.4)

and the baselines: spos (uniform single path) and ps_depth/ps_width (uniform shrinking).
Π-NAS ("Pi-NAS", ICCV 2021) is here too, unsupervised: pinas trains the supernet by cross-path
mean-teacher contrast without labels, then linear_head fits only the classifier on its frozen
features so that archs can be ranked by top-1; pinas can also precede the supervised stages.

Every phase restarts its learning rate, warms up linearly and decays by cosine to 0. Epochs and
learning rates are the paper's; a preset scales all epochs by one factor and all learning rates
by another, so the ratios between phases stay the paper's.
"""

import json
import math
import os
import random
import signal
import time
from collections import deque
from contextlib import contextmanager
from copy import deepcopy
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import parallel
import supernet
from data import mix_seed

# ---------------------------------------------------------------- presets


@dataclass(frozen=True)
class Preset:
    """Everything a run's numbers depend on. Epochs and lrs of the stages are the paper's,
    multiplied by `epoch_scale` and `lr_scale`."""

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
    probe_every: int = 200        # steps between running rank probes (0: phase ends only)
    probe_calib_batches: int = 4
    probe_eval_images: int = 1000
    log_every: int = 20
    checkpoint_every: int = 500
    queue_size: int = 65536       # Π-NAS negatives (MoCo's size; small datasets need fewer)
    cpu_threads: int = 0          # torch threads on CPU (0: torch's default); results depend on it

    @property
    def shape(self) -> supernet.NetShape:
        return supernet.NetShape(self.image_size, self.in_channels, self.num_classes,
                                 self.width_mult, self.divisor)


PRESETS = {
    # CPU smoke run on a Fashion-MNIST subset: every stage runs, a paper epoch is about one step.
    "tiny": Preset(
        "tiny", "fashion-mnist", 28, 1, 10, width_mult=0.125, divisor=2, batch_size=64,
        epoch_scale=0.008, lr_scale=10, warmup_epochs=1, warmup_lr=0.1, train_subset=5000,
        eval_subset=1000, calib_batches=4, calib_batch_size=128,
        gt_epochs=1.5, gt_lr=0.1, gt_batch_size=64, gt_n=8,
        probe_every=0, probe_calib_batches=2, probe_eval_images=500, log_every=5,
        checkpoint_every=50, queue_size=1024),
    # Rank evidence on 2 CPU cores: 10,000 Fashion-MNIST images at 14 px (2 x 2 averaged),
    # all 10,000 held out, every ground-truth arch trained with 2 seeds. The recipe (6 epochs
    # of the subset) is the best of a measured curve of seed-vs-seed agreement on archs apart
    # from the headline ones (bench/gt_recipe.py): 12 epochs agreed less, 1-1.5 epochs of all
    # 60,000 images less too. A paper epoch is 7 steps (as many as at 0.03 of 60,000 images).
    "small": Preset(
        "small", "fashion-mnist", 14, 1, 10, width_mult=0.125, divisor=2, batch_size=256,
        epoch_scale=0.18, lr_scale=10, warmup_epochs=12, warmup_lr=0.1, train_subset=10000,
        calib_batches=10, calib_batch_size=256,
        gt_epochs=6, gt_lr=0.1, gt_batch_size=256, gt_label_smoothing=0.1, gt_n=40,
        probe_every=0, probe_calib_batches=2, probe_eval_images=2000, log_every=10,
        checkpoint_every=200, queue_size=4096, cpu_threads=2),
    # One GPU, about an hour: CIFAR-10 at half width, a paper epoch is a quarter of CIFAR.
    "cifar": Preset(
        "cifar", "cifar10", 32, 3, 10, width_mult=0.5, divisor=4, batch_size=256,
        epoch_scale=0.25, lr_scale=10, warmup_epochs=15, warmup_lr=0.2, eval_subset=10000,
        calib_batches=8, calib_batch_size=250, gt_epochs=8, gt_lr=0.2, gt_n=50,
        probe_every=200, probe_calib_batches=4, probe_eval_images=2000, queue_size=4096),
    # The cifar budget on Fashion-MNIST (60,000 images), for GPU machines that cannot download
    # CIFAR: carry the four .gz files and pass --data-dir.
    "fashion": Preset(
        "fashion", "fashion-mnist", 28, 1, 10, width_mult=0.5, divisor=4, batch_size=256,
        epoch_scale=0.25, lr_scale=10, warmup_epochs=15, warmup_lr=0.2, eval_subset=10000,
        calib_batches=8, calib_batch_size=250, gt_epochs=8, gt_lr=0.2, gt_n=50,
        probe_every=200, probe_calib_batches=4, probe_eval_images=2000, queue_size=4096),
    # The paper's schedule on ImageNet (the warm-up and ground truth recipe are ours).
    "paper": Preset(
        "paper", "imagenet", 224, 3, 1000, width_mult=1.0, divisor=8, batch_size=256,
        epoch_scale=1.0, lr_scale=1.0, warmup_epochs=90, warmup_lr=0.1, eval_subset=50000,
        gt_epochs=90, gt_lr=0.1, gt_n=50, probe_every=2000, probe_eval_images=5000,
        checkpoint_every=2000),
}


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


# ---------------------------------------------------------------- sampling spaces and phases

FULL_DEPTHS = supernet.DEPTH_RANGES
MAX_ONLY = tuple((d, d) for d in supernet.MAX_DEPTHS)
WIDEST = ((1,),) * 4


@dataclass(frozen=True)
class Phase:
    """One stretch of training with one sampling space and one learning-rate schedule."""

    stage: str
    name: str
    epochs: float                 # epochs of our training set: the paper's x preset.epoch_scale
    lr: float                     # initial lr: the paper's x preset.lr_scale
    k: int                        # archs sampled per step
    depths: tuple = FULL_DEPTHS   # (lo, hi) per stage
    widths: tuple = supernet.WIDTH_CODES
    sub: int | None = None        # SSE: the sub-supernet this phase trains

    def space(self) -> dict:
        return {"depths": [list(r) for r in self.depths], "widths": [list(w) for w in self.widths]}


APS_DEPTH = {  # Sec. 3.2: (epochs, lr, D1..D4 ranges); v2 and v3 change stage 4 only
    "v1": [(5, 0.001, ((4, 5), (4, 5), (6, 8), (4, 5))),
           (10, 0.002, ((3, 5), (3, 5), (4, 8), (3, 5))),
           (15, 0.004, ((2, 5), (2, 5), (2, 8), (2, 5)))],
}
APS_DEPTH["v2"] = [APS_DEPTH["v1"][0],
                   (10, 0.002, ((3, 5), (3, 5), (4, 8), (2, 5))),
                   APS_DEPTH["v1"][2]]
APS_DEPTH["v3"] = [(5, 0.001, ((4, 5), (4, 5), (6, 8), (2, 5))),
                   APS_DEPTH["v2"][1],
                   APS_DEPTH["v1"][2]]
APS_WIDTH = [(5, 0.001, ((1, 2, 3),) * 4),  # Sec. 3.2: stem+S1, S2, S3, S4 allowed codes
             (10, 0.002, ((1, 2, 3), (1, 2, 3), (1, 2, 3, 4, 5), (1, 2, 3, 4, 5))),
             (25, 0.004, supernet.WIDTH_CODES)]
APS_K = 4
# SSE regions as (stage-3 depth, stage-4 depth) pairs (Sec. 2.3, 3.4); the last group of each is
# the untouched shared copy, owner of every pair not listed before it.
SSE34 = [{(2, 2), (2, 3), (2, 4)},
         {(d3, 2) for d3 in range(3, 9)},
         {(8, 3), (8, 4), (8, 5)},
         {(d3, 5) for d3 in range(2, 8)}]
SSE34_EPOCHS = (6, 9, 6, 9)
SSE4 = [{(d3, 2) for d3 in range(2, 9)}, {(d3, 5) for d3 in range(2, 9)}]
SSE4_EPOCHS = (9, 9)  # our reading: the paper gives none; both groups get SSE34's longer length
SSE_LR = 0.003
SSE_STAGES = ("sse4", "sse34")
STAGES = ("warmup", "spos", "ps_depth", "ps_width", "aps_depth", "aps_width", "cpt", "sse4",
          "sse34", "pinas", "linear_head")
METHODS = {"full": ("warmup", "aps_depth", "aps_width", "cpt", "sse34"),
           "spos": ("warmup", "spos"),
           "ps": ("warmup", "ps_depth", "ps_width"),
           "pinas": ("pinas", "linear_head"),
           # labels only after Π-NAS; the warm-up then makes SSE's distillation teacher
           "pinas_full": ("pinas", "warmup", "aps_depth", "aps_width", "cpt", "sse34")}
SPOS_EPOCHS = sum(e for e, _, _ in APS_DEPTH["v1"]) + sum(e for e, _, _ in APS_WIDTH)
PINAS_LR = 0.03         # MoCo's SGD lr at batch 256, scaled linearly with the batch (our reading)
LINEAR_HEAD_LR = 0.03   # raw pooled features (norm ~8, one common mode) diverge above ~0.1


def check_stages(stages) -> tuple[str, ...]:
    """The stage list as a tuple; ValueError naming what cannot run."""
    stages = tuple(stages)
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise ValueError(f"unknown stage {unknown[0] if unknown else ''!r}; "
                         f"stages are {', '.join(STAGES)}")
    if set(SSE_STAGES) <= set(stages):
        raise ValueError("sse4 and sse34 are two ways to split one supernet: "
                         "a run takes one of them")
    return stages


def sse_groups(stage: str):
    """(regions, epochs of each) of an SSE stage."""
    return (SSE34, SSE34_EPOCHS) if stage == "sse34" else (SSE4, SSE4_EPOCHS)


def sse_owner(arch: supernet.Arch, stage: str) -> int:
    """The sub-supernet that owns `arch`: the first region holding its (d3, d4), else the
    shared copy (the last index)."""
    groups, _ = sse_groups(stage)
    pair = (arch.depths[2], arch.depths[3])
    return next((i for i, g in enumerate(groups) if pair in g), len(groups))


def stage_phases(stage: str, preset: Preset, aps: str = "v3") -> list[Phase]:
    """The phases of one stage: the paper's K and sampling spaces, its epochs and lrs scaled by
    the preset (the warm-up has no paper counterpart: the preset gives its own)."""
    if stage == "warmup":
        return [Phase(stage, "warmup", preset.warmup_epochs, preset.warmup_lr, 1, MAX_ONLY, WIDEST)]
    if stage == "pinas":  # from scratch, like the warm-up: its lr is not a fine-tuning lr
        lr = PINAS_LR * preset.batch_size / 256
        return [Phase(stage, "pinas", SPOS_EPOCHS * preset.epoch_scale, lr, 2)]
    if stage == "linear_head":  # a linear probe as long as the warm-up: forward passes only
        return [Phase(stage, "linear_head", preset.warmup_epochs, LINEAR_HEAD_LR, 1)]
    return [replace(p, epochs=p.epochs * preset.epoch_scale, lr=p.lr * preset.lr_scale)
            for p in paper_phases(stage, aps)]


def paper_phases(stage: str, aps: str) -> list[Phase]:
    """A stage's phases with the paper's epochs and learning rates."""
    if stage == "aps_depth":
        return [Phase(stage, f"aps_depth_{aps}/{i + 1}", e, lr, APS_K, d, WIDEST)
                for i, (e, lr, d) in enumerate(APS_DEPTH[aps])]
    if stage == "ps_depth":
        # our reading of uniform PS: every stage's lower bound drops alike, max-1, max-2, then 2
        bounds = [lambda m: m - 1, lambda m: m - 2, lambda m: 2]
        return [Phase(stage, f"ps_depth/{i + 1}", e, lr, APS_K,
                      tuple((low(m), m) for m in supernet.MAX_DEPTHS), WIDEST)
                for i, ((e, lr, _), low) in enumerate(zip(APS_DEPTH["v1"], bounds))]
    if stage in ("aps_width", "ps_width"):
        return [Phase(stage, f"{stage}/{i + 1}", e, lr, APS_K, FULL_DEPTHS, w)
                for i, (e, lr, w) in enumerate(APS_WIDTH)]
    if stage == "spos":
        # compute-matched to APS depth + width: those run K paths per step, SPOS runs one, so
        # it gets K times their epochs: as many forward/backward passes (and K times the images)
        return [Phase(stage, "spos", SPOS_EPOCHS * APS_K, 0.004, 1)]
    if stage == "cpt":
        return [Phase(stage, "cpt", 30, 0.001, 1)]
    if stage in SSE_STAGES:
        _, epochs = sse_groups(stage)
        return [Phase(stage, f"{stage}/{i}", e, SSE_LR, 1, sub=i) for i, e in enumerate(epochs)]
    raise ValueError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")


def phase_length(phase: Phase, preset: Preset, train_size: int) -> int:
    """Optimizer steps in a phase."""
    return max(1, round(phase.epochs * train_size / preset.batch_size))


def lr_at(step: int, steps: int, base: float) -> float:
    """Linear warm-up over the first 5% of the phase, then cosine decay to 0."""
    warm = max(1, steps // 20)
    if step < warm:
        return base * (step + 1) / warm
    return base * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


# ---------------------------------------------------------------- the constraint pool (CPT)

class ConstraintPool:
    """NSAS's constraint pool with the paper's Eq.-2 distance (Sec. 2.4, 3.3).

    Novelty of an arch = mean Eq.-2 distance to its `k` nearest pool members. While the pool is
    not full, the most novel recent arch joins it. Once full, each step looks at the member
    nearest to the current sample (the one its update would disturb most); if some recent arch
    is more novel with respect to the rest of the pool than that member is, it takes that
    member's place.
    """

    def __init__(self, size: int = 10, recent: int = 100, k: int = 10):
        self.size = size
        self.k = k
        self.members: list[supernet.Arch] = []
        self.recent: deque[supernet.Arch] = deque(maxlen=recent)

    def novelties(self, archs: list[supernet.Arch], others: list[supernet.Arch]) -> torch.Tensor:
        if not others:
            return torch.full((len(archs),), math.inf)
        d = torch.cdist(_code_matrix(archs), _code_matrix(others), p=1)
        return d.topk(min(self.k, len(others)), dim=1, largest=False).values.mean(1)

    def update(self, sampled: supernet.Arch) -> None:
        self.recent.append(sampled)
        candidates = [a for a in dict.fromkeys(self.recent) if a not in self.members]
        if not candidates:
            return
        if len(self.members) < self.size:
            self.members.append(candidates[int(self.novelties(candidates, self.members).argmax())])
            return
        nearest = min(range(self.size), key=lambda i: supernet.distance(self.members[i], sampled))
        rest = self.members[:nearest] + self.members[nearest + 1:]
        scores = self.novelties(candidates + [self.members[nearest]], rest)
        best = int(scores[:-1].argmax())
        if scores[best] > scores[-1]:
            self.members[nearest] = candidates[best]

    def stats(self) -> dict:
        """Size, mean and min pairwise Eq.-2 distance, mean novelty of the members, their codes."""
        n = len(self.members)
        out = {"size": n, "mean_dist": 0.0, "min_dist": 0.0, "novelty": 0.0,
               "archs": [supernet.encode(a) for a in self.members]}
        if n > 1:
            d = torch.cdist(_code_matrix(self.members), _code_matrix(self.members), p=1)
            pairs = d[torch.triu_indices(n, n, 1).unbind()]
            others = d + torch.diag(torch.full((n,), math.inf))
            nearest = others.topk(min(self.k, n - 1), 1, largest=False).values
            out.update(mean_dist=pairs.mean().item(), min_dist=pairs.min().item(),
                       novelty=nearest.mean().item())
        return out

    def state(self) -> dict:
        return {"members": [supernet.encode(a) for a in self.members],
                "recent": [supernet.encode(a) for a in self.recent]}

    def load(self, state: dict) -> None:
        self.members = [supernet.decode(c) for c in state["members"]]
        self.recent.clear()
        self.recent.extend(supernet.decode(c) for c in state["recent"])


def _code_matrix(archs: list[supernet.Arch]) -> torch.Tensor:
    return torch.tensor([supernet.layer_codes(a) for a in archs], dtype=torch.float32)


# ---------------------------------------------------------------- the run's state, log and files

class EventLog:
    """`events.jsonl`: one JSON object per line, flushed at once, the contract with the TUI."""

    def __init__(self, path: Path | None):
        self.file = open(path, "a", encoding="utf-8") if path else None

    def __call__(self, event: str, **fields) -> dict:
        record = {"time": time.time(), "event": event, **fields}
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        return record


class TrainingError(Exception):
    """Training cannot go on (a non-finite loss, a refused checkpoint); the message says where."""


class Stopped(Exception):
    """Ctrl-C: a checkpoint was written and the run can be resumed."""


@dataclass
class TrainState:
    """Everything a checkpoint holds: weights, optimizer, position, RNG, pool, SSE copies, and
    Π-NAS's teacher and queue while its stage runs."""

    preset: Preset
    stages: tuple
    seed: int
    aps: str = "v3"
    kd: bool = True
    net: supernet.Supernet = None
    optimizer: torch.optim.Optimizer | None = None   # the current phase's; None between phases
    phase_index: int = 0          # into the flat list of all stages' phases
    step: int = 0                 # within that phase
    rng: random.Random = None
    pool: ConstraintPool = field(default_factory=ConstraintPool)
    kd_teacher: dict | None = None  # SSE's distillation teacher (a StaticNet's weights)
    sse_stage: str | None = None  # the SSE stage that split the supernet; None before any split
    subnets: dict = field(default_factory=dict)  # SSE: sub-supernet index -> its weights
    current_sub: int | None = None  # the sub-supernet whose weights `net` holds now
    cpt_members: list = field(default_factory=list)  # SSE: the CPT pool's codes at the split
    projector: nn.Module | None = None          # Π-NAS, during its stage: the student's head,
    mean_teacher: nn.ModuleDict | None = None   # the EMA teacher (net and projector),
    queue: "NegativeQueue | None" = None        # and the negatives
    stop_requested: bool = False

    def config(self) -> dict:
        return run_config(self.preset, self.stages, self.seed, self.aps, self.kd)

    def phases(self) -> list[Phase]:
        return [p for s in self.stages for p in stage_phases(s, self.preset, self.aps)]

    def device(self) -> torch.device:
        return self.net.fc.weight.device


def run_config(preset: Preset, stages, seed: int, aps: str, kd: bool) -> dict:
    """What a run's results depend on: config.json, and the key a checkpoint must match."""
    return {"preset": asdict(preset), "stages": list(stages), "seed": seed, "aps": aps, "kd": kd}


def config_diff(a: dict, b: dict) -> list[str]:
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def preset_from_config(config: dict) -> Preset:
    """The run's preset; TrainingError for a config.json written by another version."""
    try:
        return Preset(**config["preset"])
    except (TypeError, KeyError) as e:
        raise TrainingError(f"config.json was written by another version of nas.py ({e}); "
                            "start a new run")


def state_from_config(config: dict, device) -> TrainState:
    preset = preset_from_config(config)
    return new_state(preset, config["stages"], config["seed"], device, config["aps"], config["kd"])


def new_state(preset: Preset, stages, seed: int, device, aps: str = "v3",
              kd: bool = True) -> TrainState:
    stages = check_stages(stages)
    torch.manual_seed(seed)
    net = supernet.Supernet(preset.shape).to(device)
    if torch.device(device).type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    return TrainState(preset, stages, seed, aps, kd, net, rng=random.Random(seed))


def make_optimizer(params, lr: float) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=3e-5)


def trainable(st: TrainState, phase: Phase) -> list[nn.Parameter]:
    """What a phase's optimizer steps: the linear probe only the classifier, Π-NAS also its
    projector, every other phase the supernet."""
    if phase.stage == "linear_head":
        return list(st.net.fc.parameters())
    if phase.stage == "pinas":
        return [*st.net.parameters(), *st.projector.parameters()]
    return list(st.net.parameters())


def replace_atomically(path: Path, write) -> None:
    """`write(tmp)` then rename tmp over `path`: a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def last_checkpoint(run_dir: Path) -> Path:
    """Where a run keeps the checkpoint it resumes from."""
    return run_dir / "checkpoints" / "last.pt"


def save_checkpoint(st: TrainState, path: Path) -> None:
    """Atomic: a crash while writing leaves the previous checkpoint whole. Every rank calls it
    at the same step; their BN statistics are averaged, then rank 0 alone writes."""
    parallel.average_buffers(*[m for m in (st.net, st.mean_teacher) if m is not None])
    if not parallel.is_main():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    pinas = None
    if st.queue is not None:
        pinas = {"projector": st.projector.state_dict(),
                 "mean_teacher": st.mean_teacher.state_dict(), "queue": st.queue.state()}
    blob = {"config": st.config(), "phase_index": st.phase_index, "step": st.step,
            "net": st.net.state_dict(),
            "optimizer": st.optimizer.state_dict() if st.optimizer else None,
            "rng": st.rng.getstate(), "pool": st.pool.state(), "kd_teacher": st.kd_teacher,
            "sse_stage": st.sse_stage, "subnets": st.subnets, "current_sub": st.current_sub,
            "cpt_members": st.cpt_members, "pinas": pinas}
    replace_atomically(path, lambda tmp: torch.save(blob, tmp))


CHECKPOINT_KEYS = {"config", "phase_index", "step", "net", "optimizer", "rng", "pool", "kd_teacher",
                   "sse_stage", "subnets", "current_sub", "cpt_members", "pinas"}


def load_checkpoint(st: TrainState, path: Path, extend: bool = False) -> None:
    """Restore `st` from `path`; TrainingError when it is unreadable or from another config.

    With `extend`, the checkpoint may also be a finished run whose stages begin st's, so st goes
    on where it ended (the ablation's chains: +CPT starts where APS_v3 ended). Options only
    later stages use (the APS version before aps_depth, KD before SSE) may then differ.
    """
    try:
        blob = torch.load(path, map_location=st.device(), weights_only=True)
        config = blob["config"]
    except Exception as e:
        raise TrainingError(f"checkpoint {path} cannot be read ({type(e).__name__}): "
                            "it is damaged or not ours")
    missing = CHECKPOINT_KEYS - blob.keys()
    if missing:
        raise TrainingError(f"checkpoint {path} lacks {', '.join(sorted(missing))}: "
                            "an older version of this program wrote it")
    if config != st.config() and not (extend and _begins(config, blob["phase_index"], st)):
        raise TrainingError(f"checkpoint {path} was made with a different config "
                            f"({', '.join(config_diff(config, st.config()))}); "
                            "resume with the same options or start a new --run")
    st.net.load_state_dict(blob["net"])
    st.phase_index = blob["phase_index"]
    st.step = blob["step"]
    st.rng.setstate(_as_tuple(blob["rng"]))
    st.pool.load(blob["pool"])
    st.kd_teacher = blob["kd_teacher"]
    st.sse_stage = blob["sse_stage"]
    st.subnets = blob["subnets"]
    st.current_sub = blob["current_sub"]
    st.cpt_members = blob["cpt_members"]
    if blob["pinas"] is not None:
        start_pinas(st)
        st.projector.load_state_dict(blob["pinas"]["projector"])
        st.mean_teacher.load_state_dict(blob["pinas"]["mean_teacher"])
        st.queue.load(blob["pinas"]["queue"])
    if blob["optimizer"] is not None:
        st.optimizer = make_optimizer(trainable(st, st.phases()[st.phase_index]), 0.0)
        st.optimizer.load_state_dict(blob["optimizer"])


def _begins(config: dict, phase_index: int, st: TrainState) -> bool:
    """Whether a run of `config`, finished at `phase_index`, is the beginning of st's run."""
    stages = tuple(config["stages"])
    finished = phase_index == sum(len(stage_phases(s, st.preset, config["aps"])) for s in stages)
    unused = {"stages"}
    if "aps_depth" not in stages:
        unused.add("aps")
    if not set(SSE_STAGES) & set(stages):
        unused.add("kd")
    same_start = st.stages[:len(stages)] == stages
    return finished and same_start and set(config_diff(config, st.config())) <= unused


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


# ---------------------------------------------------------------- losses of one step

def autocast(device):
    return torch.autocast("cuda", torch.bfloat16, enabled=torch.device(device).type == "cuda")


def ce_step(st: TrainState, archs, x, y, weight: float = 1.0) -> list[torch.Tensor]:
    """The primitive: forward + backward of each arch on the same batch, gradients accumulate."""
    losses = []
    for arch in archs:
        with autocast(x.device):
            loss = F.cross_entropy(st.net(x, arch), y)
        (loss * weight).backward()
        losses.append(loss.detach())
    return losses


def sample_in(st: TrainState, phase: Phase) -> supernet.Arch:
    """An arch from the phase's space; in SSE, from the sub-supernet's region of (d3, d4)."""
    if phase.sub is not None:
        groups, _ = sse_groups(phase.stage)
        d3, d4 = st.rng.choice(sorted(groups[phase.sub]))
        return supernet.sample_arch(st.rng, FULL_DEPTHS[:2] + ((d3, d3), (d4, d4)), phase.widths)
    return supernet.sample_arch(st.rng, phase.depths, phase.widths)


def sampled_step(st: TrainState, phase: Phase, x, y):
    """SPOS, PS and APS (Sec. 2.1, 2.2, Eq. 1): K archs from the phase's space, summed gradients."""
    archs = [sample_in(st, phase) for _ in range(phase.k)]
    return archs, ce_step(st, archs, x, y)


def warmup_step(st: TrainState, phase: Phase, x, y):
    """Full-net warm-up: the largest net alone (our stage; the challenge gave a pretrained one)."""
    return [supernet.MAX_ARCH], ce_step(st, [supernet.MAX_ARCH], x, y)


def cpt_step(st: TrainState, phase: Phase, x, y):
    """Candidate Plasticity Training (Sec. 2.4, 3.3): 0.5 CE(sampled) + 0.5 mean CE(pool).

    The pool losses backpropagate into the shared weights: that is what regularises the
    update against forgetting the pool's archs (the NSAS demo detaches them; we do not).
    """
    arch = sample_in(st, phase)
    st.pool.update(arch)
    losses = ce_step(st, [arch], x, y, 0.5)
    losses += ce_step(st, st.pool.members, x, y, 0.5 / len(st.pool.members))
    return [arch] + st.pool.members, losses


def sse_step(st: TrainState, phase: Phase, x, y, distiller: nn.Module | None):
    """Sub-supernet Enhancing (Sec. 2.3, 3.4): 0.4 CE + 0.2 pool CE + 0.4 KD ("Dis").

    Our readings: the pool term is the mean over the pool (as in CPT); each sub-supernet keeps
    the CPT pool's members inside its region and goes on with NSAS's rule on its own samples
    only (`begin_phase`); KD is Hinton's KL(teacher || student) at temperature 1 with
    `distiller` as the teacher. Without KD the paper gives no weights: we drop the KD term and
    scale the other two to sum to 1 with the paper's 2 : 1 ratio, 2/3 CE + 1/3 pool CE.
    """
    arch = sample_in(st, phase)
    st.pool.update(arch)
    w_ce, w_pool = (0.4, 0.2) if distiller is not None else (2 / 3, 1 / 3)
    with autocast(x.device):
        logits = st.net(x, arch)
        loss = F.cross_entropy(logits, y)
        total = w_ce * loss
        if distiller is not None:
            with torch.no_grad():
                target = F.softmax(distiller(x).float(), 1)
            kd = F.kl_div(F.log_softmax(logits.float(), 1), target, reduction="batchmean")
            total = total + 0.4 * kd
    total.backward()
    losses = [loss.detach()] + ce_step(st, st.pool.members, x, y, w_pool / len(st.pool.members))
    return [arch] + st.pool.members, losses


# ---------------------------------------------------------------- SSE weight copies

def swap_sub(st: TrainState, sub: int | None) -> None:
    """Make the supernet hold sub-supernet `sub`'s weights, storing the current one's first.

    Weights are copied into the existing parameters, so optimizer references stay valid and
    no module is ever deep-copied."""
    if st.current_sub == sub:
        return
    if st.current_sub is not None:
        st.subnets[st.current_sub] = {k: v.clone() for k, v in st.net.state_dict().items()}
    if sub is not None:
        st.net.load_state_dict(st.subnets[sub])
    st.current_sub = sub


def split_for_sse(st: TrainState, stage: str) -> None:
    """Every sub-supernet, and the shared copy (the last index), starts from the CPT weights;
    the CPT pool is kept for the sub-supernets to start theirs from."""
    groups, _ = sse_groups(stage)
    weights = st.net.state_dict()
    st.subnets = {i: {k: v.clone() for k, v in weights.items()} for i in range(len(groups) + 1)}
    st.current_sub = len(groups)
    st.sse_stage = stage
    st.cpt_members = [supernet.encode(a) for a in st.pool.members]


def choose_kd_teacher(st: TrainState, score, log) -> None:
    """SSE's teacher: the warm-up's full net, or the supernet's largest subnet as APS and CPT
    left it, whichever `score` finds more accurate; both top-1s go to the log.

    The paper distils from the pretrained ResNet-48 the challenge handed out. Our warm-up
    stands in for it, and at small budgets it can be weaker than the largest subnet after the
    stages that follow it; a weaker teacher would pull SSE down, so we take the stronger one.
    """
    if not st.kd or st.kd_teacher is None or score is None:
        return
    warm = distillation_teacher(st)
    largest = supernet.extract_subnet(st.net, supernet.MAX_ARCH)
    warm_top1, largest_top1 = parallel.from_main((score(warm), score(largest)))
    chosen = "largest subnet" if largest_top1 > warm_top1 else "warm-up"
    if largest_top1 > warm_top1:
        st.kd_teacher = {k: v.clone() for k, v in largest.state_dict().items()}
    log("kd_teacher", warmup_top1=warm_top1, largest_subnet_top1=largest_top1, chosen=chosen)


def distillation_teacher(st: TrainState) -> nn.Module | None:
    """SSE's teacher as a network in eval mode, or None without KD."""
    if not st.kd or st.kd_teacher is None:
        return None
    net = supernet.StaticNet(supernet.MAX_ARCH, st.preset.shape).to(st.device())
    net.load_state_dict(st.kd_teacher)
    return net.eval().requires_grad_(False)


# ---------------------------------------------------------------- Π-NAS

PINAS_DIM = 128
PINAS_T = 0.2
PINAS_MOMENTUM = 0.999


class Projector(nn.Module):
    """Π-NAS's MLP head on pooled features, to a 128-d unit vector. Its first layer is sliced
    to the path's width, like the supernet's classifier."""

    def __init__(self, width: int, dim: int = PINAS_DIM):
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, dim)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        h = F.relu(F.linear(f, self.fc1.weight[:, :f.shape[1]], self.fc1.bias))
        return F.normalize(self.fc2(h).float(), dim=1)


class NegativeQueue:
    """A fixed-size FIFO of unit vectors: each step's keys overwrite the oldest entries.

    It starts as random unit vectors, as MoCo's does, so the first steps have negatives too;
    `fill` counts the real keys pushed so far (capped at the size)."""

    def __init__(self, size: int, dim: int, device, seed: int):
        g = torch.Generator().manual_seed(mix_seed(seed, 13))
        self.vectors = F.normalize(torch.randn(size, dim, generator=g), dim=1).to(device)
        self.ptr = 0
        self.fill = 0

    def push(self, keys: torch.Tensor) -> None:
        size = len(self.vectors)
        keys = keys[-size:]
        idx = (self.ptr + torch.arange(len(keys), device=self.vectors.device)) % size
        self.vectors[idx] = keys.to(self.vectors.dtype)
        self.ptr = (self.ptr + len(keys)) % size
        self.fill = min(size, self.fill + len(keys))

    def state(self) -> dict:
        return {"vectors": self.vectors, "ptr": self.ptr, "fill": self.fill}

    def load(self, state: dict) -> None:
        self.vectors.copy_(state["vectors"])
        self.ptr = state["ptr"]
        self.fill = state["fill"]


def start_pinas(st: TrainState) -> None:
    """The projector, the mean teacher (a copy of the student, made once per stage) and the
    queue. Seeded apart from the global RNG, so a run resumed before this stage builds the
    same ones."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(mix_seed(st.seed, 11))
        projector = Projector(st.net.fc.in_features).to(st.device())
    st.projector = projector
    teacher = nn.ModuleDict({"net": deepcopy(st.net), "projector": deepcopy(projector)})
    st.mean_teacher = teacher.requires_grad_(False)
    st.queue = NegativeQueue(st.preset.queue_size, PINAS_DIM, st.device(), st.seed)


def sample_path_pair(rng: random.Random, depth_ranges=FULL_DEPTHS,
                     width_codes=supernet.WIDTH_CODES):
    """Two archs that differ in every choice the space leaves open: each stage's depth and
    output width, and the conv1 width of every block both have (Π-NAS's cross-path pairs)."""
    a = supernet.sample_arch(rng, depth_ranges, width_codes)

    def other(value, options):
        rest = [o for o in options if o != value]
        return rng.choice(rest) if rest else value

    depths = tuple(other(d, range(lo, hi + 1)) for d, (lo, hi) in zip(a.depths, depth_ranges))
    outs = tuple(other(o, width_codes[s]) for s, o in enumerate(a.outs))
    mids = []
    for s in range(4):
        mids.append(tuple(other(a.mids[s][i], width_codes[s]) if i < a.depths[s]
                          else rng.choice(width_codes[s]) for i in range(depths[s])))
    return a, supernet.Arch(depths, outs, tuple(mids))


def contrastive_views(x: torch.Tensor, n: int, g: torch.Generator) -> list[torch.Tensor]:
    """n augmented views of a (normalized) batch, on its device, in one grid_sample: random
    resized crop (area 0.2-1, aspect 3/4-4/3), flip, brightness and contrast jitter, and for
    colour images grayscale with p = 0.2 (MoCo v2's recipe without blur, for small images)."""
    m = n * len(x)
    area = torch.empty(m).uniform_(0.2, 1, generator=g)
    aspect = torch.empty(m).uniform_(-math.log(4 / 3), math.log(4 / 3), generator=g).exp()
    w = (area * aspect).sqrt().clamp(max=1)
    h = (area / aspect).sqrt().clamp(max=1)
    cx = (torch.rand(m, generator=g) * 2 - 1) * (1 - w)
    cy = (torch.rand(m, generator=g) * 2 - 1) * (1 - h)
    flip = torch.where(torch.rand(m, generator=g) < 0.5, -1.0, 1.0)
    zero = torch.zeros(m)
    contrast = torch.empty(m).uniform_(0.6, 1.4, generator=g)
    shift = torch.empty(m).uniform_(-0.4, 0.4, generator=g)
    gray = (torch.rand(m, generator=g) < 0.2).float()
    # every random number is drawn on the host, then copied to the device once
    params = torch.stack([w * flip, zero, cx, zero, h, cy, contrast, shift, gray], 1)
    params = params.to(x.device, non_blocking=True)
    theta = params[:, :6].view(m, 2, 3)
    contrast, shift, gray = params[:, 6:, None, None, None].unbind(1)
    xs = x.float().repeat(n, 1, 1, 1)
    grid = F.affine_grid(theta, list(xs.shape), align_corners=False)
    out = F.grid_sample(xs, grid, align_corners=False)
    if x.shape[1] == 3:
        out = torch.lerp(out, out.mean(1, keepdim=True).expand_as(out), gray)
    out = out * contrast + shift
    if out.is_cuda:
        out = out.contiguous(memory_format=torch.channels_last)
    return list(out.chunk(n))


def teacher_embed(st: TrainState, x: torch.Tensor, arch: supernet.Arch,
                  perm: torch.Tensor) -> torch.Tensor:
    """The mean teacher's keys for `x` through `arch`, with shuffle-BN done on one device: the
    batch is permuted and split in two halves whose BN statistics are computed apart, so no
    key is normalized with the same batch statistics as its query (the student sees the whole
    batch in order). On several GPUs MoCo gets this by shuffling the keys across devices."""
    net, projector = st.mean_teacher["net"], st.mean_teacher["projector"]
    f = torch.cat([net.features(half, arch) for half in x[perm].chunk(2)])
    return projector(f)[perm.argsort()]


def info_nce(q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """-log of the positive's softmax share against the queue's negatives, temperature 0.2."""
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ negatives.T], 1) / PINAS_T
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


def pinas_step(st: TrainState, phase: Phase, x: torch.Tensor):
    """Π-NAS (Pi-NAS Sec. 3): cross-path learning with a nontrivial mean teacher.

    Four views q0, k0, q1, k1; two paths A and B that differ in every choice. The student runs A
    on q0 and B on q1, the teacher A on k0 and B on k1; the positive of student A is teacher B
    and vice versa, so each path is pulled toward the other's features (the feature shift the
    paper names), with the queue's negatives keeping the teacher nontrivial. Loss: the mean of
    the two InfoNCE terms. The queue then receives the normalized mean of the two teacher keys.
    Labels are never read: this function is not given them.
    """
    g = torch.Generator().manual_seed(mix_seed(st.seed, st.phase_index, st.step, 5))
    q0, k0, q1, k1 = contrastive_views(x, 4, g)
    a, b = sample_path_pair(st.rng, phase.depths, phase.widths)
    perm = torch.randperm(len(x), generator=g).to(x.device)
    negatives = st.queue.vectors
    with autocast(x.device):
        with torch.no_grad():
            ka = teacher_embed(st, k0, a, perm)
            kb = teacher_embed(st, k1, b, perm)
        qa = st.projector(st.net.features(q0, a))
        qb = st.projector(st.net.features(q1, b))
        loss = 0.5 * (info_nce(qa, kb, negatives) + info_nce(qb, ka, negatives))
    loss.backward()  # before the push: the loss's graph holds the queue as it was
    st.queue.push(parallel.gather_rows(F.normalize(ka + kb, dim=1)))  # the same on every rank
    return [a, b], [loss.detach()]


def used_slices(net: supernet.Supernet, arch: supernet.Arch) -> list[tuple[str, int, int]]:
    """(module name, out channels, in channels) of every sliced conv+BN that `arch` runs."""
    used = [("stem", supernet.stem_channels(arch, net.shape), net.shape.in_channels)]
    for b in supernet.blocks_of(arch, net.shape):
        name = f"stages.{b.stage}.{b.index}"
        used += [(f"{name}.conv1", b.mid, b.cin), (f"{name}.conv2", b.cout, b.mid)]
        if net.stages[b.stage][b.index].shortcut is not None:
            used.append((f"{name}.shortcut", b.cout, b.cin))
    return used


@torch.no_grad()
def update_mean_teacher(st: TrainState, archs, momentum: float = PINAS_MOMENTUM) -> None:
    """teacher <- m teacher + (1 - m) student on the slices the step's paths ran (their union),
    and on the projector's; every other teacher weight keeps its value. A path's update says
    nothing about weights it did not use, so averaging those in would only drag the teacher
    toward weights that other paths last left there."""
    student = dict(st.net.named_modules())
    teacher = dict(st.mean_teacher["net"].named_modules())
    masks = {}
    for arch in archs:
        for name, cout, cin in used_slices(st.net, arch):
            shape = student[name].weight.shape[:2]
            mask = masks.setdefault(name, student[name].weight.new_zeros(shape))
            mask[:cout, :cin] = 1 - momentum
    for name, w in masks.items():
        s, t = student[name], teacher[name]
        t.weight.lerp_(s.weight, w[:, :, None, None])
        rows = w.amax(1)
        t.bn.weight.lerp_(s.bn.weight, rows)
        t.bn.bias.lerp_(s.bn.bias, rows)
    width = max(supernet.feature_width(a, st.net.shape) for a in archs)
    sp, tp = st.projector, st.mean_teacher["projector"]
    tp.fc1.weight[:, :width].lerp_(sp.fc1.weight[:, :width], 1 - momentum)
    for t, s in [(tp.fc1.bias, sp.fc1.bias), (tp.fc2.weight, sp.fc2.weight),
                 (tp.fc2.bias, sp.fc2.bias)]:
        t.lerp_(s, 1 - momentum)


def linear_head_step(st: TrainState, phase: Phase, x, y):
    """Π-NAS's ranking needs a classifier (its training saw no labels): our reading of its linear
    evaluation trains only the supernet's sliced classifier on frozen features, a random path
    per batch, so every arch can then be ranked by calibrated top-1 like any other run's.
    Frozen includes BN: features use the batch's statistics, and the running statistics stay
    as Π-NAS left them (every evaluation recalibrates them per arch anyway)."""
    arch = sample_in(st, phase)
    with autocast(x.device):
        with torch.no_grad(), running_statistics_frozen(st.net):
            f = st.net.features(x, arch)
        logits = F.linear(f, st.net.fc.weight[:, :f.shape[1]], st.net.fc.bias)
        loss = F.cross_entropy(logits, y)
    loss.backward()
    return [arch], [loss.detach()]


@contextmanager
def running_statistics_frozen(net: nn.Module):
    """BN normalizes with the batch's statistics, as in training, and keeps its running ones:
    momentum 0 makes the running update r <- (1 - 0) r + 0 b a no-op."""
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.momentum = 0.0
    try:
        yield
    finally:
        for bn, m in zip(bns, momenta):
            bn.momentum = m


# ---------------------------------------------------------------- one step of any stage

STEPS = {"warmup": warmup_step, "spos": sampled_step, "ps_depth": sampled_step,
         "ps_width": sampled_step, "aps_depth": sampled_step, "aps_width": sampled_step,
         "cpt": cpt_step, "linear_head": linear_head_step}


def train_step(st: TrainState, phase: Phase, data, key: int, distiller):
    """One optimizer step's forward/backward work: (archs run, their losses)."""
    x, y = data.train_batch(key, st.step, st.preset.batch_size, parallel.part())
    if phase.stage == "pinas":
        return pinas_step(st, phase, x)  # the labels stop here: Π-NAS never sees them
    if phase.stage in SSE_STAGES:
        return sse_step(st, phase, x, y, distiller)
    return STEPS[phase.stage](st, phase, x, y)


# ---------------------------------------------------------------- stage set-up and tear-down
#
# What a phase needs before its first step and what it leaves behind after its last, in one
# place, so that `run_phase` is the loop and nothing else.

def begin_phase(st: TrainState, phase: Phase, log, score=None) -> nn.Module | None:
    """Set a phase up (again, when a run resumes inside it); SSE's distillation teacher, if any."""
    distiller = None
    if phase.stage in SSE_STAGES:
        if st.sse_stage != phase.stage:
            choose_kd_teacher(st, score, log)
            split_for_sse(st, phase.stage)
        swap_sub(st, phase.sub)
        if st.step == 0:  # each sub-supernet's pool starts from the CPT members in its region
            members = [supernet.decode(c) for c in st.cpt_members]
            st.pool.members = [m for m in members if sse_owner(m, phase.stage) == phase.sub]
            st.pool.recent.clear()  # and admits only its own samples, never the last stage's
        distiller = distillation_teacher(st)
        if st.kd and distiller is None:
            log("warning", message=f"{phase.name}: distillation asked for, but no warm-up ran "
                                   "before it to be the teacher; training without KD")
    if phase.stage == "pinas" and st.queue is None:
        start_pinas(st)
    if st.optimizer is None:
        st.optimizer = make_optimizer(trainable(st, phase), phase.lr)
    return distiller


def end_phase(st: TrainState, phase: Phase, last: bool) -> None:
    """What a phase leaves for the next: the warm-up's net as SSE's teacher, the shared copy in
    the supernet after SSE, no Π-NAS teacher or queue after Π-NAS, no optimizer."""
    parallel.average_buffers(st.net)  # so every rank copies the same net
    if phase.stage == "warmup":
        full = supernet.extract_subnet(st.net, supernet.MAX_ARCH)
        st.kd_teacher = {k: v.clone() for k, v in full.state_dict().items()}
    if last and phase.stage == "pinas":
        st.projector = None
        st.mean_teacher = None
        st.queue = None
    if last and phase.stage in SSE_STAGES:
        swap_sub(st, len(sse_groups(phase.stage)[0]))
    st.optimizer = None


def after_step(st: TrainState, phase: Phase, archs) -> None:
    """Work that follows the optimizer step: Π-NAS's teacher follows the student."""
    if phase.stage == "pinas":
        update_mean_teacher(st, archs)


def progress_extras(st: TrainState, phase: Phase) -> dict:
    """Stage-specific fields of a progress event."""
    if phase.stage == "pinas":
        return {"queue_fill": st.queue.fill / len(st.queue.vectors), "ema_momentum": PINAS_MOMENTUM}
    return {}


def uses_pool(phase: Phase) -> bool:
    return phase.stage == "cpt" or phase.stage in SSE_STAGES


def probes_allowed(phase: Phase) -> bool:
    """Π-NAS has no trained classifier: a rank probe there would measure noise."""
    return phase.stage != "pinas"


# ---------------------------------------------------------------- the loop

def train(st: TrainState, data, run_dir: Path | None, log, probe=None, score=None) -> TrainState:
    """Run every phase of `st.stages` from the state's position; checkpoint as it goes.

    `probe(st)` (optional) returns rank metrics of a probe set, logged as `rank` events every
    `preset.probe_every` steps and at every phase end. `score(net)` (optional) is the top-1 of
    a static net with its BN recalibrated: SSE uses it to choose its distillation teacher.
    Ctrl-C finishes the current step, writes a checkpoint and raises Stopped; a second Ctrl-C
    interrupts at once.
    """
    phases = st.phases()
    ckpt = last_checkpoint(run_dir) if run_dir else None
    previous = signal.getsignal(signal.SIGINT)

    def on_sigint(signum, frame):
        if st.stop_requested:
            raise KeyboardInterrupt
        st.stop_requested = True

    signal.signal(signal.SIGINT, on_sigint)
    log("plan", phases=phase_plan(st.preset, st.stages, st.aps, data.train_size))
    stage_started = time.perf_counter()  # a resumed stage counts from the resume
    try:
        while st.phase_index < len(phases):
            phase = phases[st.phase_index]
            before = phases[st.phase_index - 1] if st.phase_index > 0 else None
            after = phases[st.phase_index + 1] if st.phase_index + 1 < len(phases) else None
            first = before is None or before.stage != phase.stage
            last = after is None or after.stage != phase.stage
            if first:
                stage_started = time.perf_counter()
                if st.step == 0:
                    log("stage_start", stage=phase.stage)
            run_phase(st, phase, data, log, ckpt, probe if probes_allowed(phase) else None, score)
            end_phase(st, phase, last)
            st.phase_index += 1
            st.step = 0
            if ckpt:
                save_checkpoint(st, ckpt)
                if last:
                    save_checkpoint(st, ckpt.with_name(f"{phase.stage}.pt"))
                log("checkpoint", path=str(ckpt), stage=phase.stage, phase=phase.name, step=0)
            if last:
                log("stage_end", stage=phase.stage, seconds=time.perf_counter() - stage_started)
    finally:
        signal.signal(signal.SIGINT, previous)
    return st


def phase_plan(preset: Preset, stages, aps: str, train_size: int) -> list[dict]:
    """Every phase of a run with its paths per step and steps: what the UI's ETA needs."""
    return [{"stage": p.stage, "phase": p.name, "k": p.k,
             "steps": phase_length(p, preset, train_size)}
            for s in stages for p in stage_phases(s, preset, aps)]


def run_phase(st: TrainState, phase: Phase, data, log, ckpt: Path | None, probe,
              score=None) -> None:
    """The loop of one phase: lr, step, log, checkpoint, probe, and Ctrl-C."""
    preset = st.preset
    steps = phase_length(phase, preset, data.train_size)
    log("phase_start", stage=phase.stage, phase=phase.name, index=st.phase_index + 1,
        of=len(st.phases()), steps=steps, lr=phase.lr, k=phase.k, space=phase.space(),
        sub=phase.sub, resumed_at=st.step)
    distiller = begin_phase(st, phase, log, score)
    key = mix_seed(st.seed, st.phase_index)
    pending, seen, loss = [], 0, None
    t0 = started = time.perf_counter()
    st.net.train()
    while st.step < steps:
        for group in st.optimizer.param_groups:
            group["lr"] = lr_at(st.step, steps, phase.lr)
        st.optimizer.zero_grad(set_to_none=True)
        archs, losses = train_step(st, phase, data, key, distiller)
        parallel.average_gradients(trainable(st, phase))
        st.optimizer.step()
        after_step(st, phase, archs)
        st.step += 1
        seen += preset.batch_size * len(archs)
        pending.append((archs, torch.stack(losses)))
        at_log = st.step % preset.log_every == 0 or st.step == steps
        if at_log or (st.stop_requested and parallel.world_size() == 1):
            check_same_archs(pending, phase, st.step)
            loss = check_finite(pending, phase, st.step)
            ips = seen / max(time.perf_counter() - t0, 1e-9)
            log("progress", stage=phase.stage, phase=phase.name, step=st.step, steps=steps,
                loss=loss, lr=st.optimizer.param_groups[0]["lr"], ips=ips,
                epoch=st.step * preset.batch_size / data.train_size, **progress_extras(st, phase))
            if uses_pool(phase):
                log("pool", stage=phase.stage, step=st.step, **st.pool.stats())
            pending, seen, t0 = [], 0, time.perf_counter()
        if agreed_stop(st, at_log):
            if ckpt:
                save_checkpoint(st, ckpt)
                log("checkpoint", path=str(ckpt), stage=phase.stage, phase=phase.name, step=st.step)
            raise Stopped(f"stopped in {phase.name} at step {st.step}/{steps}")
        if ckpt and _every(st.step, preset.checkpoint_every, steps):
            save_checkpoint(st, ckpt)
            log("checkpoint", path=str(ckpt), stage=phase.stage, phase=phase.name, step=st.step)
        if probe and _every(st.step, preset.probe_every, steps):
            log_probe(st, phase, probe, log)
    log("phase_end", stage=phase.stage, phase=phase.name, loss=loss,
        seconds=time.perf_counter() - started)
    if probe:
        log_probe(st, phase, probe, log)


def _every(step: int, interval: int, steps: int) -> bool:
    """Whether an interval's work falls after this step (not after the last: phase end does it)."""
    return bool(interval) and step % interval == 0 and step < steps


def log_probe(st: TrainState, phase: Phase, probe, log) -> None:
    metrics = probe(st)
    st.net.train()
    if metrics:
        log("rank", stage=phase.stage, phase=phase.name, step=st.step, **metrics)


def agreed_stop(st: TrainState, at_log: bool) -> bool:
    """Whether to stop after this step: at once after Ctrl-C in one process; under torchrun
    at the next log step, once any rank has seen it, so that all stop at the same step."""
    if parallel.world_size() == 1:
        return st.stop_requested
    return at_log and parallel.any_rank(st.stop_requested)


def check_same_archs(pending, phase: Phase, step: int) -> None:
    """Under torchrun: TrainingError on every rank when the ranks trained different archs
    since the last check (only a hash of their codes travels)."""
    if parallel.world_size() == 1:
        return
    codes = ",".join(supernet.encode(a) for archs, _ in pending for a in archs)
    ranks = parallel.differing_ranks(codes)
    if ranks:
        raise TrainingError(f"ranks {ranks} sampled other archs than rank 0 in {phase.name} "
                            f"before step {step}: their arch RNGs went apart")


def check_finite(pending, phase: Phase, step: int) -> float:
    """Mean loss since the last check, over all ranks; TrainingError naming stage and arch on
    NaN/inf (on every rank: the losses are averaged first).

    Checked only every `log_every` steps, so the GPU is never made to wait in between.
    """
    losses = parallel.mean_over_ranks(torch.cat([l.float() for _, l in pending]))
    if not torch.isfinite(losses).all():
        per_step = losses.split([len(l) for _, l in pending])
        for i, ((archs, _), l) in enumerate(zip(pending, per_step)):
            bad = (~torch.isfinite(l)).nonzero()
            if len(bad):
                at = step - len(pending) + i + 1
                arch = supernet.encode(archs[int(bad[0])])
                raise TrainingError(f"non-finite loss in stage {phase.stage} "
                                    f"({phase.name}, step {at}) for arch {arch}")
    return losses.mean().item()
