"""Π-NAS: cross-path learning with a nontrivial mean teacher, without labels.

"Pi-NAS: Improving Neural Architecture Search by Reducing Supernet Training Consistency Shift"
(Peng et al., ICCV 2021; code https://github.com/Ernie1/Pi-NAS), on this repository's
supernet. Two claims, two mechanisms:

- *feature shift*: a hidden layer's input distribution varies with the path sampled before it.
  Cross-path learning pulls the features of two paths that differ in every choice toward each
  other: the positive of path A's output is path B's, and vice versa.
- *parameter shift*: the shared weights receive contradictory updates from step to step. The
  mean teacher, an exponential moving average of the student, gives slowly moving targets; its
  negatives (a queue of earlier keys, as in MoCo) keep it from collapsing to a constant.

`PiNAS` holds what this needs besides the supernet, the way MoCo's builder holds its encoders
and queue: the projector, the mean teacher and the queue, with the step's loss and the
teacher's update. Where the paper is silent we follow its code (configs/pinas_learning.py,
models/pinas.py: the loss, the queue, the optimizer, the augmentations); our own readings are
said where they are made. The queue, the momentum encoder and the augmentations are MoCo v2's
(Chen et al., "Improved Baselines with Momentum Contrastive Learning", 2020,
https://arxiv.org/abs/2003.04297).
"""

import math
import random
from copy import deepcopy

import torch
import torch.nn as nn
import torch.nn.functional as F

import parallel
import supernet
from data import mix_seed, to_device
from presets import autocast, channels_last

DIM = 128           # projector output
TEMPERATURE = 0.2   # InfoNCE
MOMENTUM = 0.999    # the mean teacher's EMA
WEIGHT_DECAY = 1e-4  # Π-NAS's SGD (the supervised stages': 3e-5)
# Π-NAS's augmentation of each of the four views (its configs/pinas_learning.py): random
# resized crop of 20-100% of the area; colour jitter of brightness, contrast, saturation
# (factors 1 +- 0.4) and hue (+- 0.4 of a turn) in a random order, with p 0.8; grayscale with
# p 0.2; Gaussian blur, sigma 0.1-2 px at 224 px (scaled with the image here), with p 0.5; flip.
CROP_AREA = (0.2, 1.0)
JITTER, HUE, JITTER_P = 0.4, 0.4, 0.8
GRAY_P = 0.2
BLUR_SIGMA, BLUR_P = (0.1, 2.0), 0.5


class Projector(nn.Module):
    """Π-NAS's MLP head on pooled features, to a 128-d unit vector. Its first layer is sliced
    to the path's width, like the supernet's classifier."""

    def __init__(self, width: int, dim: int = DIM):
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

    def state_dict(self) -> dict:
        return {"vectors": self.vectors, "ptr": self.ptr, "fill": self.fill}

    def load_state_dict(self, state: dict) -> None:
        self.vectors.copy_(state["vectors"])
        self.ptr = state["ptr"]
        self.fill = state["fill"]


def sample_path_pair(rng: random.Random, depth_ranges=supernet.DEPTH_RANGES,
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


def contrastive_views(x: torch.Tensor, pixels, n: int, g: torch.Generator) -> list[torch.Tensor]:
    """n independently augmented views of a normalized batch, on its device, batched: Π-NAS's
    augmentations (CROP_AREA .. BLUR_P), each image its own draws, in pixel space (`pixels`:
    the dataset's mean and std). Operations a channel count has no use for do nothing:
    saturation, hue and grayscale leave a 1-channel image (Fashion-MNIST) as it is, as
    torchvision's do. Crop and flip are one affine resampling (bilinear; the flip commutes with
    the pixel-wise steps and the symmetric blur); a crop window wider than the image is
    clipped to it (torchvision retries, then takes a centre crop: our reading)."""
    m, c, size = n * len(x), x.shape[1], x.shape[-1]
    area = torch.empty(m).uniform_(*CROP_AREA, generator=g)
    aspect = torch.empty(m).uniform_(-math.log(4 / 3), math.log(4 / 3), generator=g).exp()
    w = (area * aspect).sqrt().clamp(max=1)
    h = (area / aspect).sqrt().clamp(max=1)
    cx = (torch.rand(m, generator=g) * 2 - 1) * (1 - w)
    cy = (torch.rand(m, generator=g) * 2 - 1) * (1 - h)
    flip = torch.where(torch.rand(m, generator=g) < 0.5, -1.0, 1.0)
    zero = torch.zeros(m)
    jitter = torch.rand(m, generator=g) < JITTER_P  # the others keep factors that change nothing
    factors = torch.empty(m, 3).uniform_(1 - JITTER, 1 + JITTER, generator=g)
    factors = torch.where(jitter[:, None], factors, 1.0)
    hue = torch.where(jitter, torch.empty(m).uniform_(-HUE, HUE, generator=g), 0.0)
    order = torch.rand(m, 4, generator=g).argsort(1).float()  # ColorJitter's random order
    gray = (torch.rand(m, generator=g) < GRAY_P).float()
    sigma = torch.empty(m).uniform_(*BLUR_SIGMA, generator=g) * size / 224
    sigma = torch.where(torch.rand(m, generator=g) < BLUR_P, sigma, 0.0)
    # every random number is drawn on the host, then copied to the device once, without a sync
    params = to_device(torch.stack([w * flip, zero, cx, zero, h, cy, *factors.T, hue, gray, sigma,
                                    *order.T], 1), x.device)
    theta = params[:, :6].view(m, 2, 3)
    factors, hue, gray, sigma = params[:, 6:9], params[:, 9], params[:, 10], params[:, 11]
    order = params[:, 12:].long()
    mean, std = (t.to(x.device).float().reshape(1, -1, 1, 1) for t in pixels)
    xs = (x.float() * std + mean).repeat(n, 1, 1, 1)  # pixels in [0, 1]
    grid = F.affine_grid(theta, list(xs.shape), align_corners=False)
    out = F.grid_sample(xs, grid, align_corners=False)
    out = color_jitter(out, factors, hue, order)
    if c == 3:
        out = torch.lerp(out, grayscale(out).expand_as(out), gray[:, None, None, None])
    out = (gaussian_blur(out, sigma) - mean) / std
    if channels_last(out.device):
        out = out.contiguous(memory_format=torch.channels_last)
    return list(out.chunk(n))


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma of RGB images with torchvision's weights, one channel."""
    r, g, b = x.unbind(1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def color_jitter(x: torch.Tensor, factors: torch.Tensor, hue: torch.Tensor,
                 order: torch.Tensor) -> torch.Tensor:
    """torchvision's ColorJitter on [0, 1] images, batched with a factor per image: brightness,
    contrast and saturation factors (m x 3), a hue shift in turns (m), and each image's order
    of the four (m x 4, a permutation of 0..3). Every step clamps to [0, 1], as torchvision's."""
    def view(v):
        return v[:, None, None, None]

    def contrast(x, f):
        mean = (grayscale(x) if x.shape[1] == 3 else x).mean((1, 2, 3), keepdim=True)
        return (f * x + (1 - f) * mean).clamp(0, 1)

    ops = [lambda x, f: (f * x).clamp(0, 1), contrast]
    if x.shape[1] == 3:
        ops += [lambda x, f: (f * x + (1 - f) * grayscale(x)).clamp(0, 1), shift_hue]
    values = [view(factors[:, 0]), view(factors[:, 1]), view(factors[:, 2]), view(hue)]
    still = [1.0, 1.0, 1.0, 0.0]  # the factor that leaves an image as it is
    for position in range(4):
        for j, op in enumerate(ops):
            x = op(x, torch.where(view(order[:, position] == j), values[j], still[j]))
    return x


def shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """torchvision's adjust_hue, batched: through HSV, the hue turned by `shift` (m x 1 x 1 x 1,
    in turns), and back."""
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    same = maxc == minc
    span = maxc - minc
    s = span / torch.where(same, 1.0, maxc)
    span = torch.where(same, 1.0, span)
    rc, gc, bc = (maxc - r) / span, (maxc - g) / span, (maxc - b) / span
    hue = ((maxc == r) * (bc - gc) + ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
           + ((maxc != g) & (maxc != r)) * (4.0 + gc - rc))
    hue = torch.fmod(torch.fmod(hue / 6.0 + 1.0, 1.0) + shift[:, 0] + 1.0, 1.0)
    i = torch.floor(hue * 6.0)
    f = hue * 6.0 - i
    i = i.long() % 6
    v = maxc
    p = (v * (1.0 - s)).clamp(0, 1)
    q = (v * (1.0 - s * f)).clamp(0, 1)
    t = (v * (1.0 - s * (1.0 - f))).clamp(0, 1)
    table = torch.stack([torch.stack(c, 1) for c in
                         ((v, q, p, p, t, v), (t, v, v, q, p, p), (p, p, t, v, v, q))], 1)
    return table.gather(2, i[:, None, None].expand(-1, 3, 1, -1, -1)).squeeze(2)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Each image blurred with its own sigma (m; 0: unchanged) by a separable Gaussian kernel
    of radius 3 sigma at most, reflected at the borders: torchvision's gaussian_blur, batched."""
    m, c, h, w = x.shape
    radius = max(1, math.ceil(3 * BLUR_SIGMA[1] * max(h, w) / 224))
    radius = min(radius, h - 1, w - 1)  # reflection needs the kernel inside the image
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    pdf = torch.exp(-0.5 * (t / sigma.clamp_min(1e-6)[:, None]) ** 2)
    kernel = (pdf / pdf.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (m c) x taps
    flat = F.pad(x.reshape(1, m * c, h, w), (radius,) * 4, mode="reflect")
    flat = F.conv2d(flat, kernel[:, None, :, None], groups=m * c)
    flat = F.conv2d(flat, kernel[:, None, None, :], groups=m * c)
    return flat.reshape(m, c, h, w)


def info_nce(q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """-log of the positive's softmax share against the queue's negatives, temperature 0.2, in
    fp32 also under autocast (bf16 similarities of unit vectors are off by up to 0.004, a
    softmax at temperature 0.2 of thousands of them is not)."""
    with torch.autocast(q.device.type, enabled=False):
        q, k, negatives = q.float(), k.float(), negatives.float()
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ negatives.T], 1) / TEMPERATURE
        target = torch.zeros(len(q), dtype=torch.long, device=q.device)
        return F.cross_entropy(logits, target)


def used_slices(net: supernet.Supernet, arch: supernet.Arch) -> list[tuple[str, int, int]]:
    """(module name, out channels, in channels) of every sliced conv+BN that `arch` runs."""
    used = [("stem", supernet.stem_channels(arch, net.shape), net.shape.in_channels)]
    for b in supernet.blocks_of(arch, net.shape):
        name = f"stages.{b.stage}.{b.index}"
        used += [(f"{name}.conv1", b.mid, b.cin), (f"{name}.conv2", b.cout, b.mid)]
        if net.stages[b.stage][b.index].shortcut is not None:
            used.append((f"{name}.shortcut", b.cout, b.cin))
    return used


class PiNAS:
    """The projector (the student's head), the mean teacher (supernet and projector) and the
    queue of negatives, around the student supernet `net`.

    Built once per Π-NAS stage, from the supernet as it is then; seeded apart from the global
    RNG, so that a run resumed before this stage builds the same one. `cross_path` False is
    the control of bench/mechanisms.py: the same loss and steps, but each student path's
    positive is the teacher's output on the same path, so only cross-path learning differs."""

    def __init__(self, net: supernet.Supernet, queue_size: int, seed: int,
                 cross_path: bool = True):
        device = net.fc.weight.device
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mix_seed(seed, 11))
            self.projector = Projector(net.fc.in_features).to(device)
        self.mean_teacher = nn.ModuleDict({"net": deepcopy(net),
                                           "projector": deepcopy(self.projector)})
        self.mean_teacher.requires_grad_(False)
        self.queue = NegativeQueue(queue_size, DIM, device, seed)
        self.seed = seed
        self.cross_path = cross_path

    def teacher_keys(self, x: torch.Tensor, arch: supernet.Arch,
                     perm: torch.Tensor) -> torch.Tensor:
        """The mean teacher's keys for `x` through `arch`, with shuffle-BN done on one device:
        the batch is permuted and split in two halves whose BN statistics are computed apart,
        so no key is normalized with the same batch statistics as its query (the student sees
        the whole batch in order). On several GPUs MoCo gets this by shuffling across them."""
        net, projector = self.mean_teacher["net"], self.mean_teacher["projector"]
        f = torch.cat([net.features(half, arch) for half in x[perm].chunk(2)])
        return projector(f)[perm.argsort()]

    def step(self, net: supernet.Supernet, x: torch.Tensor, pixels, rng: random.Random,
             g: torch.Generator, depths=supernet.DEPTH_RANGES, widths=supernet.WIDTH_CODES):
        """One step's forward and backward (Π-NAS Sec. 3), no labels: (the two paths, [loss]).

        Four views q0, k0, q1, k1 of the batch (drawn with `g`; `pixels`: the dataset's mean
        and std); two paths a and b that differ in every choice (drawn with `rng` from the
        phase's space). The student runs a on q0 and b on q1, the teacher a on k0 and b on k1;
        the positive of student a is teacher b and vice versa, so each path is pulled toward
        the other's features. The loss is the sum of the two InfoNCE terms against the queue's
        negatives (Π-NAS's code). After the backward pass (whose graph holds the queue as it
        was) the queue receives the mean of the two teacher keys, not renormalised (as in
        Π-NAS's code), gathered from every rank so that all push the same.

        Where Π-NAS's code differs and we keep ours: it updates the teacher twice a step, once
        per path before that path's key (each path's blocks, and the shared stem and head
        twice); we update it once after the step, on the slices either path ran
        (`update_teacher`)."""
        q0, k0, q1, k1 = contrastive_views(x, pixels, 4, g)
        a, b = sample_path_pair(rng, depths, widths)
        perm = to_device(torch.randperm(len(x), generator=g), x.device)
        negatives = self.queue.vectors
        with autocast(x.device):
            with torch.no_grad():
                ka = self.teacher_keys(k0, a, perm)
                kb = self.teacher_keys(k1, b, perm)
            qa = self.projector(net.features(q0, a))
            qb = self.projector(net.features(q1, b))
            pa, pb = (kb, ka) if self.cross_path else (ka, kb)  # the positives
            loss = info_nce(qa, pa, negatives) + info_nce(qb, pb, negatives)
        loss.backward()
        self.queue.push(parallel.gather_rows((ka + kb) / 2))
        return [a, b], [loss.detach()]

    @torch.no_grad()
    def update_teacher(self, net: supernet.Supernet, archs, momentum: float = MOMENTUM) -> None:
        """teacher <- m teacher + (1 - m) student, on the slices the step's paths ran (their
        union) and on the projector. Our reading: every other teacher weight keeps its value. A
        path's update says nothing about weights it did not use, so averaging those in would
        only drag the teacher toward weights that other paths last left there."""
        student = dict(net.named_modules())
        teacher = dict(self.mean_teacher["net"].named_modules())
        masks = {}
        for arch in archs:
            for name, cout, cin in used_slices(net, arch):
                shape = student[name].weight.shape[:2]
                mask = masks.setdefault(name, student[name].weight.new_zeros(shape))
                mask[:cout, :cin] = 1 - momentum
        for name, w in masks.items():
            s, t = student[name], teacher[name]
            t.weight.lerp_(s.weight, w[:, :, None, None])
            rows = w.amax(1)
            t.bn.weight.lerp_(s.bn.weight, rows)
            t.bn.bias.lerp_(s.bn.bias, rows)
        width = max(supernet.feature_width(a, net.shape) for a in archs)
        sp, tp = self.projector, self.mean_teacher["projector"]
        tp.fc1.weight[:, :width].lerp_(sp.fc1.weight[:, :width], 1 - momentum)
        for t, s in [(tp.fc1.bias, sp.fc1.bias), (tp.fc2.weight, sp.fc2.weight),
                     (tp.fc2.bias, sp.fc2.bias)]:
            t.lerp_(s, 1 - momentum)

    def state_dict(self) -> dict:
        return {"projector": self.projector.state_dict(), "cross_path": self.cross_path,
                "mean_teacher": self.mean_teacher.state_dict(), "queue": self.queue.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.cross_path = state["cross_path"]
        self.projector.load_state_dict(state["projector"])
        self.mean_teacher.load_state_dict(state["mean_teacher"])
        self.queue.load_state_dict(state["queue"])
