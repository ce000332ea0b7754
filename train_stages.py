"""Supernet training: data, the K-path step, every stage of the paper, checkpoints and the event log.

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
Every phase restarts its learning rate, warms up linearly and decays by cosine to 0.
Epochs and learning rates are the paper's; a preset scales all epochs by one factor and all
learning rates by another, so the ratios between phases stay the paper's.
"""

import gzip
import json
import math
import os
import random
import signal
import struct
import time
from collections import deque
from copy import deepcopy
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import supernet as sn

# ---------------------------------------------------------------- presets


@dataclass(frozen=True)
class Preset:
    """Everything a run's numbers depend on. Epochs and lrs of the stages are the paper's,
    multiplied by `epoch_scale` and `lr_scale`."""

    name: str
    dataset: str                  # fashion-mnist | cifar10 | cifar100 | imagenet
    image_size: int
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
    gt_n: int = 50                # ground-truth archs
    gt_twice: int = 10            # of which trained with a second seed (noise ceiling)
    probe_every: int = 200        # steps between running rank probes (0: phase ends only)
    probe_calib_batches: int = 4
    probe_eval_images: int = 1000
    log_every: int = 20
    checkpoint_every: int = 500
    queue_size: int = 65536       # Π-NAS negatives (MoCo's size; small datasets need fewer)

    @property
    def shape(self) -> sn.NetShape:
        return sn.NetShape(self.image_size, self.in_channels, self.num_classes, self.width_mult, self.divisor)


# ---------------------------------------------------------------- data

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                       "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class DataError(Exception):
    """A dataset that cannot be had; the message says how to get it."""


def _mix(*numbers: int) -> int:
    """One 63-bit seed from several integers, so every (run, phase, step) has its own stream."""
    h = 0x9E3779B97F4A7C15
    for n in numbers:
        h = (h * 0x100000001B3 ^ (n & 0xFFFFFFFFFFFFFFFF)) & 0x7FFFFFFFFFFFFFFF
    return h


def _read_idx_gz(path: Path) -> torch.Tensor:
    """An IDX file (the MNIST format): magic with the number of dims in byte 3, big-endian sizes, bytes."""
    raw = gzip.open(path).read()
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    return torch.frombuffer(bytearray(raw[4 + 4 * ndim:]), dtype=torch.uint8).reshape(dims)


def _fashion_mnist(data_dir: Path | None):
    for d in [data_dir, data_dir and data_dir / "FashionMNIST" / "raw", FASHION_MNIST_DIR]:
        if d and all((d / f).exists() for f in FASHION_MNIST_FILES):
            xs = [_read_idx_gz(d / f) for f in FASHION_MNIST_FILES]
            return xs[0][:, None], xs[1].long(), xs[2][:, None], xs[3].long()
    raise DataError("Fashion-MNIST not found: install it with `apt-get install -y dataset-fashion-mnist` "
                    f"(files in {FASHION_MNIST_DIR}) or pass --data-dir holding the four .gz files")


def _cifar(name: str, data_dir: Path | None):
    import torchvision
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    root = data_dir or Path("data")
    try:
        train, test = (cls(str(root), train=t, download=True) for t in (True, False))
    except Exception as e:  # torchvision raises URLError, RuntimeError or OSError when offline
        raise DataError(f"{name} could not be loaded from {root} or downloaded ({type(e).__name__}); "
                        "put the dataset there with --data-dir, or use --preset tiny (Fashion-MNIST, offline)")

    def nchw(ds):
        return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets)
    return (*nchw(train), *nchw(test))


class TensorData:
    """A small dataset kept whole on the training device as uint8, augmented there in batches
    (random crop with zero padding, horizontal flip): no per-image DataLoader work.

    Every batch is a pure function of (key, step), so a resumed run sees the same batches.
    """

    def __init__(self, train_x, train_y, test_x, test_y, device, pad: int):
        self.device, self.pad = torch.device(device), pad
        self.train_x, self.train_y = train_x.to(self.device), train_y.to(self.device)
        self.test_x, self.test_y = test_x.to(self.device), test_y.to(self.device)
        pixels = train_x[:10000].float().div(255).transpose(0, 1).flatten(1)
        self.mean = pixels.mean(1).view(1, -1, 1, 1).to(self.device)
        self.std = pixels.std(1).view(1, -1, 1, 1).to(self.device)
        self.train_size = len(self.train_y)
        self._perm_key, self._perm = None, None

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.float().div_(255) - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if x.is_cuda else x

    def train_batch(self, key: int, step: int, batch_size: int):
        n = len(self.train_y)
        epoch, i = divmod(step, max(1, n // batch_size))
        if self._perm_key != (key, epoch):
            g = torch.Generator().manual_seed(_mix(key, epoch))
            self._perm_key, self._perm = (key, epoch), torch.randperm(n, generator=g).to(self.device)
        idx = self._perm[i * batch_size:(i + 1) * batch_size]
        x = self.augment(self.train_x[idx], torch.Generator().manual_seed(_mix(key, epoch, i, 1)))
        return self.normalize(x), self.train_y[idx]

    def augment(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        b, c, h, w = x.shape
        dev, p = x.device, self.pad
        oy = torch.randint(0, 2 * p + 1, (b, 1), generator=g).to(dev, non_blocking=True)
        ox = torch.randint(0, 2 * p + 1, (b, 1), generator=g).to(dev, non_blocking=True)
        flip = (torch.rand(b, 1, generator=g) < 0.5).to(dev, non_blocking=True)
        rows = oy + torch.arange(h, device=dev)
        cols = ox + torch.arange(w, device=dev)
        cols = torch.where(flip, cols.flip(1), cols)
        xp = F.pad(x, (p, p, p, p))
        return xp[torch.arange(b, device=dev)[:, None, None, None], torch.arange(c, device=dev)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]

    def calib_batches(self, n_batches: int, batch_size: int, seed: int):
        """A fixed, seeded subset of training images, un-augmented, for BN recalibration."""
        g = torch.Generator().manual_seed(_mix(seed, 7))
        idx = torch.randperm(len(self.train_y), generator=g)[:n_batches * batch_size].to(self.device)
        return [self.normalize(self.train_x[j]) for j in idx.split(batch_size)]

    def eval_batches(self, limit: int, batch_size: int):
        n = len(self.test_y) if limit <= 0 else min(limit, len(self.test_y))
        return [(self.normalize(self.test_x[i:min(i + batch_size, n)]), self.test_y[i:min(i + batch_size, n)])
                for i in range(0, n, batch_size)]


class FolderData:
    """ImageNet-style folders (`train/`, `val/` of class sub-folders) through torchvision's
    ImageFolder and a DataLoader with workers: too large to keep on the device."""

    def __init__(self, root: Path, image_size: int, device, workers: int = 8):
        import torchvision.transforms as T
        from torchvision.datasets import ImageFolder
        if not (root / "train").is_dir() or not (root / "val").is_dir():
            raise DataError(f"ImageNet folder {root} must hold train/ and val/ with one sub-folder per class")
        norm = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
        self.device, self.workers = torch.device(device), workers
        self.train = ImageFolder(str(root / "train"), T.Compose(
            [T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(), norm]))
        self.plain = ImageFolder(str(root / "train"), T.Compose(
            [T.Resize(image_size * 8 // 7), T.CenterCrop(image_size), T.ToTensor(), norm]))
        self.val = ImageFolder(str(root / "val"), self.plain.transform)
        self.train_size = len(self.train)
        self._iter_key, self._iter = None, None

    def _loader(self, dataset, indices, batch_size):
        subset = torch.utils.data.Subset(dataset, indices)
        return torch.utils.data.DataLoader(subset, batch_size, num_workers=self.workers, drop_last=False,
                                           pin_memory=self.device.type == "cuda", persistent_workers=False)

    def _to_device(self, x, y):
        x = x.to(self.device, non_blocking=True)
        x = x.contiguous(memory_format=torch.channels_last) if x.is_cuda else x
        return x, y.to(self.device, non_blocking=True)

    def train_batch(self, key: int, step: int, batch_size: int):
        per_epoch = max(1, len(self.train) // batch_size)
        epoch, i = divmod(step, per_epoch)
        if self._iter_key != (key, epoch, i):  # a fresh epoch, or a resume in the middle of one
            g = torch.Generator().manual_seed(_mix(key, epoch))
            perm = torch.randperm(len(self.train), generator=g)[i * batch_size:per_epoch * batch_size].tolist()
            self._iter = iter(self._loader(self.train, perm, batch_size))
        self._iter_key = (key, epoch, i + 1)
        return self._to_device(*next(self._iter))

    def calib_batches(self, n_batches: int, batch_size: int, seed: int):
        g = torch.Generator().manual_seed(_mix(seed, 7))
        idx = torch.randperm(len(self.plain), generator=g)[:n_batches * batch_size].tolist()
        return [self._to_device(x, y)[0] for x, y in self._loader(self.plain, idx, batch_size)]

    def eval_batches(self, limit: int, batch_size: int):
        n = len(self.val) if limit <= 0 else min(limit, len(self.val))
        return [self._to_device(x, y) for x, y in self._loader(self.val, list(range(n)), batch_size)]


def load_data(preset: Preset, device, data_dir: Path | None = None, seed: int = 0):
    """The preset's dataset on `device`; DataError with the way to get it when it is missing."""
    if preset.dataset == "imagenet":
        if data_dir is None:
            raise DataError("the paper preset needs ImageNet: pass --data-dir holding train/ and val/")
        return FolderData(data_dir, preset.image_size, device)
    if preset.dataset == "fashion-mnist":
        tx, ty, vx, vy = _fashion_mnist(data_dir)
        pad = 2
    elif preset.dataset in ("cifar10", "cifar100"):
        tx, ty, vx, vy = _cifar(preset.dataset, data_dir)
        pad = 4
    else:
        raise DataError(f"unknown dataset {preset.dataset!r}")
    if preset.train_subset:
        keep = torch.randperm(len(ty), generator=torch.Generator().manual_seed(_mix(seed, 3)))[:preset.train_subset]
        tx, ty = tx[keep], ty[keep]
    return TensorData(tx, ty, vx, vy, device, pad)


# ---------------------------------------------------------------- sampling spaces and phases

FULL_DEPTHS = sn.DEPTH_RANGES
MAX_ONLY = tuple((d, d) for d in sn.MAX_DEPTHS)
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
    widths: tuple = sn.WIDTH_CODES
    sub: int | None = None        # SSE: the sub-supernet this phase trains

    def space(self) -> dict:
        return {"depths": [list(r) for r in self.depths], "widths": [list(w) for w in self.widths]}


APS_DEPTH = {  # Sec. 3.2: (epochs, lr, D1..D4 ranges); v2 and v3 change stage 4 only
    "v1": [(5, 0.001, ((4, 5), (4, 5), (6, 8), (4, 5))),
           (10, 0.002, ((3, 5), (3, 5), (4, 8), (3, 5))),
           (15, 0.004, ((2, 5), (2, 5), (2, 8), (2, 5)))],
}
APS_DEPTH["v2"] = [APS_DEPTH["v1"][0], (10, 0.002, ((3, 5), (3, 5), (4, 8), (2, 5))), APS_DEPTH["v1"][2]]
APS_DEPTH["v3"] = [(5, 0.001, ((4, 5), (4, 5), (6, 8), (2, 5))), APS_DEPTH["v2"][1], APS_DEPTH["v1"][2]]
APS_WIDTH = [(5, 0.001, ((1, 2, 3),) * 4),  # Sec. 3.2: stem+S1, S2, S3, S4 allowed codes
             (10, 0.002, ((1, 2, 3), (1, 2, 3), (1, 2, 3, 4, 5), (1, 2, 3, 4, 5))),
             (25, 0.004, sn.WIDTH_CODES)]
# SSE regions as (stage-3 depth, stage-4 depth) pairs (Sec. 2.3, 3.4); the last group of each is
# the untouched shared copy, owner of every pair not listed before it.
SSE34 = [{(2, 2), (2, 3), (2, 4)},
         {(d3, 2) for d3 in range(3, 9)},
         {(8, 3), (8, 4), (8, 5)},
         {(d3, 5) for d3 in range(2, 8)}]
SSE34_EPOCHS = (6, 9, 6, 9)
SSE4 = [{(d3, 2) for d3 in range(2, 9)}, {(d3, 5) for d3 in range(2, 9)}]
SSE4_EPOCHS = (9, 9)  # our reading: the paper gives no SSE4 epochs; we give both groups SSE34's longer length
SSE_LR = 0.003
STAGES = ("warmup", "spos", "ps_depth", "ps_width", "aps_depth", "aps_width", "cpt", "sse4", "sse34", "pinas",
          "linear_head")
METHODS = {"full": ("warmup", "aps_depth", "aps_width", "cpt", "sse34"),
           "spos": ("warmup", "spos"),
           "ps": ("warmup", "ps_depth", "ps_width"),
           "pinas": ("pinas", "linear_head"),
           # labels only after Π-NAS; the warm-up then makes SSE's distillation teacher from its weights
           "pinas_full": ("pinas", "warmup", "aps_depth", "aps_width", "cpt", "sse34")}
SPOS_EPOCHS = sum(e for e, _, _ in APS_DEPTH["v1"]) + sum(e for e, _, _ in APS_WIDTH)
PINAS_LR = 0.03             # MoCo's SGD lr at batch 256, scaled linearly with the batch (our reading)
LINEAR_HEAD_LR = 0.03       # raw pooled features (norm ~8, one common mode) diverge above ~0.1


def sse_groups(stage: str):
    return (SSE34, SSE34_EPOCHS) if stage == "sse34" else (SSE4, SSE4_EPOCHS)


def sse_owner(arch: sn.Arch, stage: str) -> int:
    """The sub-supernet that owns `arch`: the first region holding its (d3, d4), else the shared copy."""
    groups, _ = sse_groups(stage)
    pair = (arch.depths[2], arch.depths[3])
    return next((i for i, g in enumerate(groups) if pair in g), len(groups))


def stage_phases(stage: str, preset: Preset, aps: str = "v3") -> list[Phase]:
    """The phases of one stage: the paper's K and sampling spaces (SPEC §4), its epochs and lrs
    scaled by the preset (the warm-up has no paper counterpart: the preset gives its own)."""
    if stage == "warmup":
        return [Phase(stage, "warmup", preset.warmup_epochs, preset.warmup_lr, 1, MAX_ONLY, WIDEST)]
    if stage == "pinas":  # from scratch, like the warm-up: its lr is not a fine-tuning lr
        return [Phase(stage, "pinas", SPOS_EPOCHS * preset.epoch_scale, PINAS_LR * preset.batch_size / 256, 2)]
    if stage == "linear_head":  # a linear probe as long as the warm-up: forward passes only
        return [Phase(stage, "linear_head", preset.warmup_epochs, LINEAR_HEAD_LR, 1)]
    return [replace(p, epochs=p.epochs * preset.epoch_scale, lr=p.lr * preset.lr_scale)
            for p in paper_phases(stage, aps)]


def paper_phases(stage: str, aps: str) -> list[Phase]:
    """A stage's phases with the paper's epochs and learning rates."""
    if stage == "aps_depth":
        return [Phase(stage, f"aps_depth_{aps}/{i + 1}", e, lr, 4, d, WIDEST)
                for i, (e, lr, d) in enumerate(APS_DEPTH[aps])]
    if stage == "ps_depth":  # our reading of uniform PS: every lower bound drops alike, max-1, max-2, 2
        bounds = [lambda m: m - 1, lambda m: m - 2, lambda m: 2]
        return [Phase(stage, f"ps_depth/{i + 1}", e, lr, 4, tuple((b(m), m) for m in sn.MAX_DEPTHS), WIDEST)
                for i, ((e, lr, _), b) in enumerate(zip(APS_DEPTH["v1"], bounds))]
    if stage in ("aps_width", "ps_width"):
        return [Phase(stage, f"{stage}/{i + 1}", e, lr, 4, FULL_DEPTHS, w) for i, (e, lr, w) in enumerate(APS_WIDTH)]
    if stage == "spos":  # the same budget in epochs as APS depth + width, one path per step
        return [Phase(stage, "spos", SPOS_EPOCHS, 0.004, 1)]
    if stage == "cpt":
        return [Phase(stage, "cpt", 30, 0.001, 1)]
    if stage in ("sse4", "sse34"):
        _, epochs = sse_groups(stage)
        return [Phase(stage, f"{stage}/{i}", e, SSE_LR, 1, sub=i) for i, e in enumerate(epochs)]
    raise ValueError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")


def phase_steps(phase: Phase, preset: Preset, train_size: int) -> int:
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

    Novelty of an arch = mean Eq.-2 distance to its `k` nearest pool members. While the pool is not
    full, the most novel recent arch joins it. Once full, each step looks at the member nearest
    to the current sample (the one its update would disturb most); if some recent arch is more
    novel with respect to the rest of the pool than that member is, it takes that member's place.
    """

    def __init__(self, size: int = 10, recent: int = 100, k: int = 10):
        self.size, self.k = size, k
        self.members: list[sn.Arch] = []
        self.recent: deque[sn.Arch] = deque(maxlen=recent)

    def novelties(self, archs: list[sn.Arch], others: list[sn.Arch]) -> torch.Tensor:
        if not others:
            return torch.full((len(archs),), math.inf)
        d = torch.cdist(_code_matrix(archs), _code_matrix(others), p=1)
        return d.topk(min(self.k, len(others)), dim=1, largest=False).values.mean(1)

    def update(self, sampled: sn.Arch) -> None:
        self.recent.append(sampled)
        candidates = [a for a in dict.fromkeys(self.recent) if a not in self.members]
        if not candidates:
            return
        if len(self.members) < self.size:
            self.members.append(candidates[int(self.novelties(candidates, self.members).argmax())])
            return
        nearest = min(range(self.size), key=lambda i: sn.distance(self.members[i], sampled))
        rest = self.members[:nearest] + self.members[nearest + 1:]
        scores = self.novelties(candidates + [self.members[nearest]], rest)
        best = int(scores[:-1].argmax())
        if scores[best] > scores[-1]:
            self.members[nearest] = candidates[best]

    def stats(self) -> dict:
        """Size, mean and min pairwise Eq.-2 distance, mean novelty of the members, their codes."""
        n = len(self.members)
        out = {"size": n, "mean_dist": 0.0, "min_dist": 0.0, "novelty": 0.0,
               "archs": [sn.encode(a) for a in self.members]}
        if n > 1:
            d = torch.cdist(_code_matrix(self.members), _code_matrix(self.members), p=1)
            pairs = d[torch.triu_indices(n, n, 1).unbind()]
            nearest = (d + torch.diag(torch.full((n,), math.inf))).topk(min(self.k, n - 1), 1, largest=False).values
            out.update(mean_dist=pairs.mean().item(), min_dist=pairs.min().item(), novelty=nearest.mean().item())
        return out

    def state(self) -> dict:
        return {"members": [sn.encode(a) for a in self.members], "recent": [sn.encode(a) for a in self.recent]}

    def load(self, state: dict) -> None:
        self.members = [sn.decode(c) for c in state["members"]]
        self.recent.clear()
        self.recent.extend(sn.decode(c) for c in state["recent"])


def _code_matrix(archs: list[sn.Arch]) -> torch.Tensor:
    return torch.tensor([sn.layer_codes(a) for a in archs], dtype=torch.float32)


# ---------------------------------------------------------------- the run's state and its log

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
    """Everything a checkpoint holds: weights, optimizer, position, RNG, pool, SSE copies."""

    preset: Preset
    stages: tuple
    seed: int
    aps: str = "v3"
    kd: bool = True
    net: sn.Supernet = None
    optimizer: torch.optim.Optimizer = None
    phase_index: int = 0          # into the flat list of all stages' phases
    step: int = 0                 # within that phase
    rng: random.Random = None
    pool: ConstraintPool = field(default_factory=ConstraintPool)
    teacher: dict | None = None   # the warm-up's full net: SSE's distillation teacher
    subnets: dict = field(default_factory=dict)  # SSE sub-supernet index -> weights
    current_sub: int | None = None
    cpt_pool: list = field(default_factory=list)  # SSE: the CPT pool each sub-supernet starts from
    projector: nn.Module | None = None            # Π-NAS, during its stage: the student's projector,
    mean_teacher: nn.ModuleDict | None = None     # the EMA teacher (net, projector)
    queue: "NegativeQueue | None" = None          # and the negatives
    stop_requested: bool = False

    def config(self) -> dict:
        return run_config(self.preset, self.stages, self.seed, self.aps, self.kd)

    def phases(self) -> list[Phase]:
        return [p for s in self.stages for p in stage_phases(s, self.preset, self.aps)]


def run_config(preset: Preset, stages, seed: int, aps: str, kd: bool) -> dict:
    """What a run's results depend on: config.json, and the key a checkpoint must match."""
    return {"preset": asdict(preset), "stages": list(stages), "seed": seed, "aps": aps, "kd": kd}


def config_diff(a: dict, b: dict) -> list[str]:
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def state_from_config(config: dict, device) -> TrainState:
    return new_state(Preset(**config["preset"]), config["stages"], config["seed"], device, config["aps"], config["kd"])


def new_state(preset: Preset, stages, seed: int, device, aps: str = "v3", kd: bool = True) -> TrainState:
    torch.manual_seed(seed)
    net = sn.Supernet(preset.shape).to(device)
    if torch.device(device).type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    return TrainState(preset, tuple(stages), seed, aps, kd, net, rng=random.Random(seed))


def make_optimizer(params, lr: float) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=3e-5)


def trainable(st: TrainState, phase: Phase) -> list[nn.Parameter]:
    """What a phase's optimizer steps: the linear probe only the classifier, Π-NAS also its projector."""
    if phase.stage == "linear_head":
        return list(st.net.fc.parameters())
    if phase.stage == "pinas":
        return [*st.net.parameters(), *st.projector.parameters()]
    return list(st.net.parameters())


def save_checkpoint(st: TrainState, path: Path) -> None:
    """Atomic: written to a temp file, then renamed over the old one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {"config": st.config(), "phase_index": st.phase_index, "step": st.step,
            "net": st.net.state_dict(), "optimizer": st.optimizer.state_dict() if st.optimizer else None,
            "rng": st.rng.getstate(), "pool": st.pool.state(), "teacher": st.teacher,
            "subnets": st.subnets, "current_sub": st.current_sub, "cpt_pool": st.cpt_pool,
            "pinas": None if st.queue is None else {"projector": st.projector.state_dict(),
                                                   "teacher": st.mean_teacher.state_dict(),
                                                   "queue": st.queue.state()}}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(blob, tmp)
    os.replace(tmp, path)


def load_checkpoint(st: TrainState, path: Path, extend: bool = False) -> None:
    """Restore `st` from `path`; TrainingError when it is unreadable or from another config.

    With `extend`, the checkpoint may also be a finished run whose stages begin st's, so st goes
    on where it ended (the ablation's chains: +CPT starts where APS_v3 ended). Options only
    later stages use (the APS version before aps_depth, KD before SSE) may then differ.
    """
    try:
        blob = torch.load(path, map_location=st.net.fc.weight.device, weights_only=True)
        config = blob["config"]
    except Exception as e:
        raise TrainingError(f"checkpoint {path} cannot be read ({type(e).__name__}): it is damaged or not ours")
    if config != st.config() and not (extend and _begins(config, blob["phase_index"], st)):
        raise TrainingError(f"checkpoint {path} was made with a different config "
                            f"({', '.join(config_diff(config, st.config()))}); "
                            "resume with the same options or start a new --run")
    st.net.load_state_dict(blob["net"])
    st.phase_index, st.step = blob["phase_index"], blob["step"]
    st.rng.setstate(_as_tuple(blob["rng"]))
    st.pool.load(blob["pool"])
    st.teacher, st.subnets, st.current_sub = blob["teacher"], blob["subnets"], blob["current_sub"]
    st.cpt_pool = blob["cpt_pool"]
    if blob["pinas"] is not None:
        start_pinas(st)
        st.projector.load_state_dict(blob["pinas"]["projector"])
        st.mean_teacher.load_state_dict(blob["pinas"]["teacher"])
        st.queue.load(blob["pinas"]["queue"])
    if blob["optimizer"] is not None:
        st.optimizer = make_optimizer(trainable(st, st.phases()[st.phase_index]), 0.0)
        st.optimizer.load_state_dict(blob["optimizer"])


def _begins(config: dict, phase_index: int, st: TrainState) -> bool:
    """Whether a run of `config`, finished at `phase_index`, is the beginning of st's run."""
    stages = tuple(config["stages"])
    finished = phase_index == sum(len(stage_phases(s, st.preset, config["aps"])) for s in stages)
    unused = {"stages"} | ({"aps"} if "aps_depth" not in stages else set()) \
        | ({"kd"} if not {"sse4", "sse34"} & set(stages) else set())
    return finished and st.stages[:len(stages)] == stages and set(config_diff(config, st.config())) <= unused


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


def sample_in(st: TrainState, phase: Phase) -> sn.Arch:
    if phase.sub is not None:  # SSE: only inside the sub-supernet's region of (d3, d4)
        groups, _ = sse_groups(phase.stage)
        d3, d4 = st.rng.choice(sorted(groups[phase.sub]))
        return sn.sample_arch(st.rng, FULL_DEPTHS[:2] + ((d3, d3), (d4, d4)), phase.widths)
    return sn.sample_arch(st.rng, phase.depths, phase.widths)


def sampled_step(st: TrainState, phase: Phase, x, y):
    """SPOS, PS and APS (Sec. 2.1, 2.2, Eq. 1): K archs from the phase's space, summed gradients."""
    archs = [sample_in(st, phase) for _ in range(phase.k)]
    return archs, ce_step(st, archs, x, y)


def warmup_step(st: TrainState, phase: Phase, x, y):
    """Full-net warm-up: the largest net alone (our stage; the challenge gave a pretrained one)."""
    return [sn.MAX_ARCH], ce_step(st, [sn.MAX_ARCH], x, y)


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


def sse_step(st: TrainState, phase: Phase, x, y, teacher):
    """Sub-supernet Enhancing (Sec. 2.3, 3.4): 0.4 CE + 0.2 pool CE + 0.4 KD ("Dis").

    Our readings: the pool term is the mean over the pool (as in CPT); each sub-supernet keeps
    the CPT pool's members inside its region and goes on with NSAS's rule on its own samples;
    KD is Hinton's KL(teacher || student) at temperature 1 with the warm-up's full net as
    teacher. Without KD the weights are 0.6 CE + 0.4 pool CE (the paper does not say; we keep
    the pool term's share of the CE).
    """
    arch = sample_in(st, phase)
    st.pool.update(arch)
    w_ce, w_pool = (0.4, 0.2) if teacher is not None else (0.6, 0.4)
    with autocast(x.device):
        logits = st.net(x, arch)
        loss = F.cross_entropy(logits, y)
        total = w_ce * loss
        if teacher is not None:
            with torch.no_grad():
                target = F.softmax(teacher(x).float(), 1)
            total = total + 0.4 * F.kl_div(F.log_softmax(logits.float(), 1), target, reduction="batchmean")
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


def start_sse(st: TrainState, stage: str) -> None:
    """Split: every sub-supernet (and the shared copy, the last index) starts from the CPT weights."""
    groups, _ = sse_groups(stage)
    st.subnets = {i: {k: v.clone() for k, v in st.net.state_dict().items()} for i in range(len(groups) + 1)}
    st.current_sub = len(groups)
    st.cpt_pool = [sn.encode(a) for a in st.pool.members]


def _teacher_net(st: TrainState):
    if not st.kd or st.teacher is None:
        return None
    net = sn.StaticNet(sn.MAX_ARCH, st.preset.shape).to(st.net.fc.weight.device)
    net.load_state_dict(st.teacher)
    return net.eval().requires_grad_(False)


# ---------------------------------------------------------------- Π-NAS

PINAS_DIM, PINAS_T, PINAS_MOMENTUM = 128, 0.2, 0.999


class Projector(nn.Module):
    """Π-NAS's MLP head on pooled features, to a 128-d unit vector. Its first layer is sliced
    to the path's width, like the supernet's classifier."""

    def __init__(self, width: int, dim: int = PINAS_DIM):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, width), nn.Linear(width, dim)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        h = F.relu(F.linear(f, self.fc1.weight[:, :f.shape[1]], self.fc1.bias))
        return F.normalize(self.fc2(h).float(), dim=1)


class NegativeQueue:
    """A fixed-size FIFO of unit vectors: each step's keys overwrite the oldest entries.

    It starts as random unit vectors, as MoCo's does, so the first steps have negatives too;
    `fill` counts the real keys pushed so far (capped at the size)."""

    def __init__(self, size: int, dim: int, device, seed: int):
        g = torch.Generator().manual_seed(_mix(seed, 13))
        self.vectors = F.normalize(torch.randn(size, dim, generator=g), dim=1).to(device)
        self.ptr, self.fill = 0, 0

    def push(self, keys: torch.Tensor) -> None:
        size = len(self.vectors)
        keys = keys[-size:]
        idx = (self.ptr + torch.arange(len(keys), device=self.vectors.device)) % size
        self.vectors[idx] = keys.to(self.vectors.dtype)
        self.ptr, self.fill = (self.ptr + len(keys)) % size, min(size, self.fill + len(keys))

    def state(self) -> dict:
        return {"vectors": self.vectors, "ptr": self.ptr, "fill": self.fill}

    def load(self, state: dict) -> None:
        self.vectors.copy_(state["vectors"])
        self.ptr, self.fill = state["ptr"], state["fill"]


def start_pinas(st: TrainState) -> None:
    """The projector, the teacher (a copy of the student, made once per stage) and the queue.
    Seeded apart from the global RNG, so a run resumed before this stage builds the same ones."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_mix(st.seed, 11))
        projector = Projector(st.net.fc.in_features).to(st.net.fc.weight.device)
    st.projector = projector
    st.mean_teacher = nn.ModuleDict({"net": deepcopy(st.net), "projector": deepcopy(projector)}).requires_grad_(False)
    st.queue = NegativeQueue(st.preset.queue_size, PINAS_DIM, st.net.fc.weight.device, st.seed)


def sample_path_pair(rng: random.Random, depth_ranges=FULL_DEPTHS, width_codes=sn.WIDTH_CODES):
    """Two archs that differ in every choice the space leaves open: each stage's depth and output
    width, and the conv1 width of every block both have (Π-NAS's cross-path pairs)."""
    a = sn.sample_arch(rng, depth_ranges, width_codes)

    def other(value, options):
        rest = [o for o in options if o != value]
        return rng.choice(rest) if rest else value
    depths = tuple(other(d, range(lo, hi + 1)) for d, (lo, hi) in zip(a.depths, depth_ranges))
    outs = tuple(other(o, width_codes[s]) for s, o in enumerate(a.outs))
    mids = tuple(tuple(other(a.mids[s][i], width_codes[s]) if i < a.depths[s] else rng.choice(width_codes[s])
                       for i in range(depths[s])) for s in range(4))
    return a, sn.Arch(depths, outs, mids)


def contrastive_views(x: torch.Tensor, n: int, g: torch.Generator) -> list[torch.Tensor]:
    """n augmented views of a (normalized) batch, on its device, in one grid_sample: random
    resized crop (area 0.2-1, aspect 3/4-4/3), flip, brightness and contrast jitter, and for
    colour images grayscale with p = 0.2 (MoCo v2's recipe without blur, for small images)."""
    m = n * len(x)
    area, aspect = torch.empty(m).uniform_(0.2, 1, generator=g), torch.empty(m).uniform_(-0.288, 0.288, generator=g).exp()
    w, h = (area * aspect).sqrt().clamp(max=1), (area / aspect).sqrt().clamp(max=1)
    cx, cy = (torch.rand(m, generator=g) * 2 - 1) * (1 - w), (torch.rand(m, generator=g) * 2 - 1) * (1 - h)
    flip = torch.where(torch.rand(m, generator=g) < 0.5, -1.0, 1.0)
    zero = torch.zeros(m)
    contrast, shift = torch.empty(m).uniform_(0.6, 1.4, generator=g), torch.empty(m).uniform_(-0.4, 0.4, generator=g)
    gray = (torch.rand(m, generator=g) < 0.2).float()
    # every random number drawn on the host, then one copy to the device
    params = torch.stack([w * flip, zero, cx, zero, h, cy, contrast, shift, gray], 1).to(x.device, non_blocking=True)
    theta, (contrast, shift, gray) = params[:, :6].view(m, 2, 3), params[:, 6:, None, None, None].unbind(1)
    xs = x.float().repeat(n, 1, 1, 1)
    out = F.grid_sample(xs, F.affine_grid(theta, list(xs.shape), align_corners=False), align_corners=False)
    if x.shape[1] == 3:
        out = torch.lerp(out, out.mean(1, keepdim=True).expand_as(out), gray)
    out = out * contrast + shift
    if out.is_cuda:
        out = out.contiguous(memory_format=torch.channels_last)
    return list(out.chunk(n))


def teacher_embed(st: TrainState, x: torch.Tensor, arch: sn.Arch, perm: torch.Tensor) -> torch.Tensor:
    """The teacher's keys for `x` through `arch`, with shuffle-BN done on one device: the batch
    is permuted and split in two halves whose BN statistics are computed apart, so no key is
    normalized with the same batch statistics as its query (the student sees the whole batch in
    order). On several GPUs MoCo gets this by shuffling the keys across devices."""
    net, projector = st.mean_teacher["net"], st.mean_teacher["projector"]
    f = torch.cat([net.features(half, arch) for half in x[perm].chunk(2)])
    return projector(f)[perm.argsort()]


def info_nce(q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """-log of the positive's softmax share against the queue's negatives, temperature 0.2."""
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ negatives.T], 1) / PINAS_T
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


def pinas_step(st: TrainState, phase: Phase, x: torch.Tensor):
    """Π-NAS (Pi-NAS Sec. 3; SPEC §4 item 5): cross-path learning with a nontrivial mean teacher.

    Four views q0, k0, q1, k1; two paths A and B that differ in every choice. The student runs A
    on q0 and B on q1, the teacher A on k0 and B on k1; the positive of student A is teacher B
    and vice versa, so each path is pulled toward the other's features (the feature shift the
    paper names), with the queue's negatives keeping the teacher nontrivial. Loss: the mean of
    the two InfoNCE terms. The queue then receives the normalized mean of the two teacher keys.
    Labels are never read: this function is not given them.
    """
    g = torch.Generator().manual_seed(_mix(st.seed, st.phase_index, st.step, 5))
    q0, k0, q1, k1 = contrastive_views(x, 4, g)
    a, b = sample_path_pair(st.rng, phase.depths, phase.widths)
    perm = torch.randperm(len(x), generator=g).to(x.device)
    with autocast(x.device):
        with torch.no_grad():
            ka, kb = teacher_embed(st, k0, a, perm), teacher_embed(st, k1, b, perm)
        qa, qb = st.projector(st.net.features(q0, a)), st.projector(st.net.features(q1, b))
        loss = 0.5 * (info_nce(qa, kb, st.queue.vectors) + info_nce(qb, ka, st.queue.vectors))
    loss.backward()  # before the push: the loss's graph holds the queue as it was
    st.queue.push(F.normalize(ka + kb, dim=1))
    return [a, b], [loss.detach()]


def used_slices(net: sn.Supernet, arch: sn.Arch) -> list[tuple[str, int, int]]:
    """(module name, out channels, in channels) of every sliced conv+BN that `arch` runs."""
    stem, plan = sn.arch_channels(arch, net.shape)
    used, i = [("stem", stem, net.shape.in_channels)], 0
    for s in range(4):
        for b in range(arch.depths[s]):
            cin, mid, cout, _ = plan[i]
            used += [(f"stages.{s}.{b}.conv1", mid, cin), (f"stages.{s}.{b}.conv2", cout, mid)]
            if net.stages[s][b].shortcut is not None:
                used.append((f"stages.{s}.{b}.shortcut", cout, cin))
            i += 1
    return used


@torch.no_grad()
def update_mean_teacher(st: TrainState, archs, momentum: float = PINAS_MOMENTUM) -> None:
    """teacher <- m teacher + (1 - m) student on the slices the step's paths ran (their union),
    and on the projector's; every other teacher weight keeps its value. A path's update says
    nothing about weights it did not use, so averaging those in would only drag the teacher
    toward weights that other paths last left there."""
    student, teacher = dict(st.net.named_modules()), dict(st.mean_teacher["net"].named_modules())
    masks = {}
    for arch in archs:
        for name, cout, cin in used_slices(st.net, arch):
            mask = masks.setdefault(name, student[name].weight.new_zeros(student[name].weight.shape[:2]))
            mask[:cout, :cin] = 1 - momentum
    for name, w in masks.items():
        s, t = student[name], teacher[name]
        t.weight.lerp_(s.weight, w[:, :, None, None])
        rows = w.amax(1)
        t.bn.weight.lerp_(s.bn.weight, rows)
        t.bn.bias.lerp_(s.bn.bias, rows)
    width = max(sn.arch_channels(a, st.net.shape)[1][-1][2] for a in archs)
    sp, tp = st.projector, st.mean_teacher["projector"]
    tp.fc1.weight[:, :width].lerp_(sp.fc1.weight[:, :width], 1 - momentum)
    for t, s in [(tp.fc1.bias, sp.fc1.bias), (tp.fc2.weight, sp.fc2.weight), (tp.fc2.bias, sp.fc2.bias)]:
        t.lerp_(s, 1 - momentum)


def linear_head_step(st: TrainState, phase: Phase, x, y):
    """Π-NAS's ranking needs a classifier (its training saw no labels): our reading of its linear
    evaluation trains only the supernet's sliced classifier on frozen features, a random path
    per batch, so every arch can then be ranked by calibrated top-1 like any other run's."""
    arch = sample_in(st, phase)
    with autocast(x.device):
        with torch.no_grad():
            f = st.net.features(x, arch)
        loss = F.cross_entropy(F.linear(f, st.net.fc.weight[:, :f.shape[1]], st.net.fc.bias), y)
    loss.backward()
    return [arch], [loss.detach()]


# ---------------------------------------------------------------- the loop

def train(st: TrainState, data, run_dir: Path | None, log: EventLog, probe=None) -> TrainState:
    """Run every phase of `st.stages` from the state's position; checkpoint as it goes.

    `probe(st)` (optional) returns rank metrics of a probe set, logged as `rank` events every
    `preset.probe_every` steps and at every phase end. Ctrl-C finishes the current step, writes
    a checkpoint and raises Stopped; a second Ctrl-C interrupts at once.
    """
    phases = st.phases()
    ckpt = run_dir / "checkpoints" / "last.pt" if run_dir else None
    previous = signal.getsignal(signal.SIGINT)

    def on_sigint(signum, frame):
        if st.stop_requested:
            raise KeyboardInterrupt
        st.stop_requested = True
    signal.signal(signal.SIGINT, on_sigint)
    stage_started = time.perf_counter()  # a resumed stage counts from the resume
    try:
        while st.phase_index < len(phases):
            phase = phases[st.phase_index]
            first = st.phase_index == 0 or phases[st.phase_index - 1].stage != phase.stage
            last = st.phase_index + 1 == len(phases) or phases[st.phase_index + 1].stage != phase.stage
            if first:
                stage_started = time.perf_counter()
                if st.step == 0:
                    log("stage_start", stage=phase.stage)
            run_phase(st, phase, data, log, ckpt, probe)
            if phase.stage == "warmup":
                st.teacher = {k: v.clone() for k, v in sn.extract_subnet(st.net, sn.MAX_ARCH).state_dict().items()}
            if last and phase.stage == "pinas":  # nothing after Π-NAS needs them
                st.projector = st.mean_teacher = st.queue = None
            if last and phase.sub is not None:
                swap_sub(st, len(sse_groups(phase.stage)[0]))  # the net holds the shared copy between stages
            st.phase_index, st.step, st.optimizer = st.phase_index + 1, 0, None
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


def phase_step(st: TrainState, phase: Phase, data, key: int, teacher):
    """One optimizer step's forward/backward work: (archs run, their losses)."""
    x, y = data.train_batch(key, st.step, st.preset.batch_size)
    if phase.sub is not None:
        return sse_step(st, phase, x, y, teacher)
    if phase.stage == "pinas":
        return pinas_step(st, phase, x)
    step_fn = {"warmup": warmup_step, "cpt": cpt_step, "linear_head": linear_head_step}.get(phase.stage, sampled_step)
    return step_fn(st, phase, x, y)


def run_phase(st: TrainState, phase: Phase, data, log: EventLog, ckpt: Path | None, probe) -> None:
    preset = st.preset
    steps = phase_steps(phase, preset, data.train_size)
    if phase.stage == "pinas":
        probe = None  # the classifier is not trained yet: a probe would measure noise
    base_lr = phase.lr
    if phase.sub is not None:
        if not st.subnets:
            start_sse(st, phase.stage)
        swap_sub(st, phase.sub)
        if st.step == 0:  # each sub-supernet's pool starts from the CPT members inside its region
            st.pool.members = [m for m in map(sn.decode, st.cpt_pool) if sse_owner(m, phase.stage) == phase.sub]
    if phase.stage == "pinas" and st.queue is None:
        start_pinas(st)
    log("phase_start", stage=phase.stage, phase=phase.name, index=st.phase_index + 1, of=len(st.phases()),
        steps=steps, lr=base_lr, k=phase.k, space=phase.space(), sub=phase.sub, resumed_at=st.step)
    if st.optimizer is None:
        st.optimizer = make_optimizer(trainable(st, phase), base_lr)
    teacher = _teacher_net(st) if phase.sub is not None else None
    if phase.sub is not None and st.kd and teacher is None:
        log("warning", message=f"{phase.name}: distillation asked for, but no warm-up ran before it to be the "
                               "teacher; training without KD")
    key = _mix(st.seed, st.phase_index)
    pending, seen, loss = [], 0, None
    t0 = started = time.perf_counter()
    st.net.train()
    while st.step < steps:
        for group in st.optimizer.param_groups:
            group["lr"] = lr_at(st.step, steps, base_lr)
        st.optimizer.zero_grad(set_to_none=True)
        archs, losses = phase_step(st, phase, data, key, teacher)
        st.optimizer.step()
        if phase.stage == "pinas":
            update_mean_teacher(st, archs)
        st.step += 1
        seen += preset.batch_size * len(archs)
        pending.append((archs, torch.stack(losses)))
        if st.step % preset.log_every == 0 or st.step == steps or st.stop_requested:
            loss = check_finite(pending, phase, st.step)
            log("progress", stage=phase.stage, phase=phase.name, step=st.step, steps=steps, loss=loss,
                lr=st.optimizer.param_groups[0]["lr"], ips=seen / max(time.perf_counter() - t0, 1e-9),
                epoch=st.step * preset.batch_size / data.train_size,
                **({"queue_fill": st.queue.fill / len(st.queue.vectors), "ema_momentum": PINAS_MOMENTUM}
                   if phase.stage == "pinas" else {}))
            if phase.stage in ("cpt", "sse4", "sse34"):
                log("pool", stage=phase.stage, step=st.step, **st.pool.stats())
            pending, seen, t0 = [], 0, time.perf_counter()
        if st.stop_requested:
            if ckpt:
                save_checkpoint(st, ckpt)
                log("checkpoint", path=str(ckpt), stage=phase.stage, phase=phase.name, step=st.step)
            raise Stopped(f"stopped in {phase.name} at step {st.step}/{steps}")
        if ckpt and preset.checkpoint_every and st.step % preset.checkpoint_every == 0 and st.step < steps:
            save_checkpoint(st, ckpt)
            log("checkpoint", path=str(ckpt), stage=phase.stage, phase=phase.name, step=st.step)
        if probe and preset.probe_every and st.step % preset.probe_every == 0 and st.step < steps:
            log_probe(st, phase, probe, log)
    log("phase_end", stage=phase.stage, phase=phase.name, loss=loss, seconds=time.perf_counter() - started)
    if probe:
        log_probe(st, phase, probe, log)


def log_probe(st: TrainState, phase: Phase, probe, log: EventLog) -> None:
    metrics = probe(st)
    st.net.train()
    if metrics:
        log("rank", stage=phase.stage, phase=phase.name, step=st.step, **metrics)


def check_finite(pending, phase: Phase, step: int) -> float:
    """Mean loss since the last check; TrainingError naming stage and arch on NaN/inf.

    Checked only every `log_every` steps, so the GPU is never made to wait in between.
    """
    losses = torch.cat([l.float() for _, l in pending])
    if not torch.isfinite(losses).all():
        for i, (archs, l) in enumerate(pending):
            bad = (~torch.isfinite(l.float())).nonzero()
            if len(bad):
                at = step - len(pending) + i + 1
                raise TrainingError(f"non-finite loss in stage {phase.stage} ({phase.name}, step {at}) "
                                    f"for arch {sn.encode(archs[int(bad[0])])}")
    return losses.mean().item()

