"""The challenge's ResNet-48 search space, its arch codes and the weight-sharing supernet.

Search space (CVPR 2022 lightweight-NAS challenge, track 1): a ResNet of BasicBlocks with
elastic depth per stage and elastic width per conv, encoded as a 52-character string:

    position 0        '1' (the one image-size option)
    positions 1-4     depth of each stage (2..5, 2..5, 2..8, 2..5)
    position 5        width code of the stem (= stage-1 output, see "residual tying")
    positions 6-51    two codes (conv1, conv2) for each of the 23 block slots; '00' = absent

Width codes '1'..'7' mean the ratios 1.0 .. 0.7 of the stage's base width. Inside a stage every
conv2 (and the projection shortcut) writes into the same residual stream, so all conv2 codes
of a stage are equal, and stage 1 has no projection, so its conv2 code equals the stem's.

The supernet holds one max-size weight per layer; a subnet uses the first c channels of each
and the first d blocks of each stage. `extract_subnet` copies those slices into a plain static
network, which must compute exactly what the supernet computes for that arch.

Reference ("Eq. 2" above is its arch distance):
- "Improving the Rank Consistency of One-Shot NAS: Collaborative Solution to Multi-Model
  Forgetting and Unfair Gradient Descent", Zhang et al., OPPO Research, 2nd place of the
  CVPR 2022 lightweight-NAS challenge, supernet track (the text: ../shared/seeds/;
  https://arxiv.org/search/?query=Improving+the+Rank+Consistency+of+One-Shot+NAS&searchtype=title)
"""

import gzip
import hashlib
import json
import pickle
import random
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

MAX_DEPTHS = (5, 5, 8, 5)
DEPTH_RANGES = ((2, 5), (2, 5), (2, 8), (2, 5))
BASE_WIDTHS = (64, 128, 256, 512)
STEM_BASE = 64
STRIDES = (1, 2, 2, 2)
WIDTH_RATIOS = {1: 1.0, 2: 0.95, 3: 0.9, 4: 0.85, 5: 0.8, 6: 0.75, 7: 0.7}
# The codes the challenge's 45,000 candidates use per stage (the stem shares stage 1's).
WIDTH_CODES = ((1, 2, 3), (1, 2, 3), (1, 2, 3, 4, 5), (1, 2, 3, 4, 5, 6, 7))
SLOT_START = (6, 16, 26, 42)  # first code position of each stage's block slots
MAX_CODE = "15585" + "1" * 47
ABSENT_AS = 9  # Eq. 2 reads an absent layer's '0' as 9: closer to the narrowest than the widest


@dataclass(frozen=True)
class Arch:
    """One subnet: active depth per stage, output width code per stage, conv1 code per block.

    `outs[0]` is also the stem's width (residual tying); `mids[s]` has `depths[s]` codes.
    """

    depths: tuple[int, ...]
    outs: tuple[int, ...]
    mids: tuple[tuple[int, ...], ...]

    @property
    def stem(self) -> int:
        return self.outs[0]

    @property
    def blocks(self) -> list[tuple[int, int]]:
        """(conv1 code, conv2 code) of every active block, stage by stage."""
        return [(m, self.outs[s]) for s in range(4) for m in self.mids[s]]


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round to the nearest multiple of `divisor`, never more than 10% below `value`."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def channels(base: int, code: int, width_mult: float = 1.0, divisor: int = 8) -> int:
    return make_divisible(base * width_mult * WIDTH_RATIOS[code], divisor)


# ---------------------------------------------------------------- arch codes

def decode(code: str) -> Arch:
    """Parse a challenge arch code (52 characters, or 51 without the leading '1').

    Raises ValueError naming the position (in the string as given) and the rule broken.
    """
    if not isinstance(code, str) or len(code) not in (51, 52):
        n = len(code) if isinstance(code, str) else type(code).__name__
        raise ValueError(f"arch code has length {n}; expected 52 characters "
                         "(or 51 without the leading '1')")
    shift = 52 - len(code)  # positions below are of the 52-character form; report them as given
    full = "1" * shift + code
    for i, ch in enumerate(code):
        if ch not in "0123456789":
            raise ValueError(f"position {i}: {ch!r} is not a digit")

    def fail(pos: int, rule: str):
        raise ValueError(f"position {pos - shift}: {rule}")

    if full[0] != "1":
        fail(0, f"image-size option must be '1', got {full[0]!r}")
    depths = tuple(int(full[1 + s]) for s in range(4))
    for s, d in enumerate(depths):
        lo, hi = DEPTH_RANGES[s]
        if not lo <= d <= hi:
            fail(1 + s, f"stage {s + 1} depth {d} is outside {lo}..{hi}")
    stem = int(full[5])
    if stem not in WIDTH_CODES[0]:
        fail(5, f"stem width code {stem} is not one of {_codes(WIDTH_CODES[0])}")
    outs, mids = [], []
    for s in range(4):
        stage_mids = []
        out = stem if s == 0 else None  # stages 2-4: the first block's projection sets the width
        for b in range(MAX_DEPTHS[s]):
            pos = SLOT_START[s] + 2 * b
            pair = full[pos:pos + 2]
            where = f"stage {s + 1} block {b + 1}"
            if b >= depths[s]:
                if pair != "00":
                    fail(pos, f"{where} is absent (depth {depths[s]}) but is {pair!r}, not '00'")
                continue
            for k, c in enumerate(map(int, pair)):
                if c == 0:
                    fail(pos + k, f"{where} is present (depth {depths[s]}) but has width code 0")
                if c not in WIDTH_CODES[s]:
                    rule = f"width code {c} is not allowed in stage {s + 1}"
                    fail(pos + k, f"{rule} (allowed {_codes(WIDTH_CODES[s])})")
            conv1, conv2 = int(pair[0]), int(pair[1])
            stage_mids.append(conv1)
            if out is None:
                out = conv2
            elif conv2 != out:
                source = "the stem's code" if s == 0 else "block 1's conv2 code"
                rule = f"residual tying: {where} conv2 code {conv2}"
                fail(pos + 1, f"{rule} differs from {source} {out}")
        outs.append(out)
        mids.append(tuple(stage_mids))
    return Arch(depths, tuple(outs), tuple(mids))


def _codes(allowed) -> str:
    return f"{allowed[0]}..{allowed[-1]}"


def encode(arch: Arch) -> str:
    """The 52-character challenge code of `arch`."""
    parts = ["1", "".join(map(str, arch.depths)), str(arch.stem)]
    for s in range(4):
        for b in range(MAX_DEPTHS[s]):
            parts.append(f"{arch.mids[s][b]}{arch.outs[s]}" if b < arch.depths[s] else "00")
    return "".join(parts)


# ---------------------------------------------------------------- sampling and distance

def sample_arch(rng: random.Random, depth_ranges=DEPTH_RANGES, width_codes=WIDTH_CODES) -> Arch:
    """Uniform sample inside a sampling space: a depth range and a set of width codes per stage.

    Every free variable (depth of each stage, each stage's output width, each active block's
    conv1 width) is drawn independently and uniformly; the stem shares stage 1's codes.
    """
    depths = tuple(rng.randint(lo, hi) for lo, hi in depth_ranges)
    outs = tuple(rng.choice(width_codes[s]) for s in range(4))
    mids = tuple(tuple(rng.choice(width_codes[s]) for _ in range(depths[s])) for s in range(4))
    return Arch(depths, outs, mids)


@lru_cache(maxsize=65536)
def layer_codes(arch: Arch) -> tuple[int, ...]:
    """The stem code and the 46 block codes, '0' read as 9: the vector Eq. 2 compares."""
    return tuple(int(c) or ABSENT_AS for c in encode(arch)[5:])


def distances(a: list[Arch], b: list[Arch]) -> torch.Tensor:
    """Eq. 2 of the APS/CPT paper between every arch of `a` and every arch of `b`:
    D(i, j) = sum_k |C_i^k - C_j^k| over the stem and block width codes (len(a) x len(b),
    whole numbers held exactly in float32)."""
    def codes(archs):
        return torch.tensor([layer_codes(x) for x in archs], dtype=torch.float32)
    return torch.cdist(codes(a), codes(b), p=1)


def distance(a: Arch, b: Arch) -> int:
    """Eq. 2 between two archs."""
    return int(distances([a], [b])[0, 0])


# ---------------------------------------------------------------- network shapes

@dataclass(frozen=True)
class NetShape:
    """What a network is built for: input size and channels, classes and width scaling.

    224 px inputs get torchvision's ResNet stem (7x7/2 conv + 3x3/2 max-pool); smaller
    images (32, 28 px) a 3x3/1 conv and no pool, so the feature maps stay large enough.
    """

    image_size: int = 224
    in_channels: int = 3
    num_classes: int = 1000
    width_mult: float = 1.0
    divisor: int = 8

    def ch(self, base: int, code: int) -> int:
        return channels(base, code, self.width_mult, self.divisor)


class Block(NamedTuple):
    """One active block of an arch: where it sits and its channels."""

    stage: int    # 0..3
    index: int    # within the stage
    cin: int
    mid: int      # conv1's output width
    cout: int     # conv2's (and the shortcut's) output width
    stride: int


def stem_channels(arch: Arch, shape: NetShape) -> int:
    return shape.ch(STEM_BASE, arch.stem)


@lru_cache(maxsize=65536)
def blocks_of(arch: Arch, shape: NetShape) -> tuple[Block, ...]:
    """Every active block of `arch`, stage by stage: the one walk over the blocks."""
    out, cin = [], stem_channels(arch, shape)
    for s in range(4):
        cout = shape.ch(BASE_WIDTHS[s], arch.outs[s])
        for b, m in enumerate(arch.mids[s]):
            stride = STRIDES[s] if b == 0 else 1
            out.append(Block(s, b, cin, shape.ch(BASE_WIDTHS[s], m), cout, stride))
            cin = cout
    return tuple(out)


def physical_net(arch: Arch, shape: NetShape) -> tuple:
    """What `arch` builds at `shape`: the stem's and every block's channels. Two codes give one
    net where rounding to the divisor merges width codes (at width x0.125 all three codes of the
    64-channel stage give 8 channels): the same weights in the supernet, the same net
    stand-alone."""
    return stem_channels(arch, shape), blocks_of(arch, shape)


def stage_widths(arch: Arch) -> list[int]:
    """Each stage's mean width over its convs (conv1s and the shared conv2 width), in % of the
    stage's base: how wide an arch is at a glance."""
    return [round(100 * sum(WIDTH_RATIOS[c] for c in (*arch.mids[s], arch.outs[s]))
                  / (len(arch.mids[s]) + 1)) for s in range(4)]


def feature_width(arch: Arch, shape: NetShape) -> int:
    """Channels of the pooled features: the classifier's input."""
    return shape.ch(BASE_WIDTHS[3], arch.outs[3])


MAX_ARCH = decode(MAX_CODE)


def _stem_geometry(shape: NetShape):
    """(kernel, stride, padding, max-pool) of the stem for this input size."""
    return (7, 2, 3, True) if shape.image_size >= 128 else (3, 1, 1, False)


# ---------------------------------------------------------------- the supernet

def classify(f: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The classifier, in fp32 also under bf16 autocast: an argmax or a softmax of bf16 logits
    (8 bits of mantissa) turns near-ties into ties and rounds the tails. It is one small
    matmul; everything before it stays in the autocast's precision."""
    kind = f.device.type
    if kind not in ("cpu", "cuda") or not torch.is_autocast_enabled(kind):
        return F.linear(f, weight, bias)
    with torch.autocast(kind, enabled=False):
        return F.linear(f.float(), weight.float(), bias.float())


class SlicedConvBN(nn.Module):
    """A conv + BN pair at its widest; a subnet uses the first `cout` filters on the first
    `x.shape[1]` input channels, and the first `cout` BN parameters and running statistics
    (views, so BN's running-stat updates land in the shared buffers)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int):
        super().__init__()
        self.stride, self.padding = stride, kernel // 2
        self.weight = nn.Parameter(torch.empty(cout, cin, kernel, kernel))
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor, cout: int) -> torch.Tensor:
        w = self.weight[:cout, :x.shape[1]]
        y = F.conv2d(x, w, None, self.stride, self.padding)
        bn = self.bn
        return F.batch_norm(y, bn.running_mean[:cout], bn.running_var[:cout], bn.weight[:cout],
                            bn.bias[:cout], bn.training, bn.momentum, bn.eps)


class SuperBlock(nn.Module):
    def __init__(self, cin: int, mid: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = SlicedConvBN(cin, mid, 3, stride)
        self.conv2 = SlicedConvBN(mid, cout, 3, 1)
        self.shortcut = SlicedConvBN(cin, cout, 1, stride) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor, mid: int, cout: int) -> torch.Tensor:
        y = self.conv2(F.relu(self.conv1(x, mid)), cout)
        return F.relu(y + (x if self.shortcut is None else self.shortcut(x, cout)))


class Supernet(nn.Module):
    """The dynamic ResNet-48: `forward(x, arch)` runs the subnet `arch` on shared weights."""

    def __init__(self, shape: NetShape = NetShape()):
        super().__init__()
        self.shape = shape
        kernel, stride, _, self.pool = _stem_geometry(shape)
        self.stem = SlicedConvBN(shape.in_channels, stem_channels(MAX_ARCH, shape), kernel, stride)
        self.stages = nn.ModuleList(nn.ModuleList() for _ in range(4))
        for b in blocks_of(MAX_ARCH, shape):
            self.stages[b.stage].append(SuperBlock(b.cin, b.mid, b.cout, b.stride))
        self.fc = nn.Linear(feature_width(MAX_ARCH, shape), shape.num_classes)

    def features(self, x: torch.Tensor, arch: Arch) -> torch.Tensor:
        """Pooled features of `arch` (width = its stage-4 output channels)."""
        x = F.relu(self.stem(x, stem_channels(arch, self.shape)))
        if self.pool:
            x = F.max_pool2d(x, 3, 2, 1)
        for b in blocks_of(arch, self.shape):
            x = self.stages[b.stage][b.index](x, b.mid, b.cout)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    def forward(self, x: torch.Tensor, arch: Arch) -> torch.Tensor:
        f = self.features(x, arch)
        return classify(f, self.fc.weight[:, :f.shape[1]], self.fc.bias)


# ---------------------------------------------------------------- static subnets

class BasicBlock(nn.Module):
    def __init__(self, cin: int, mid: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, mid, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            projection = nn.Conv2d(cin, cout, 1, stride, bias=False)
            self.downsample = nn.Sequential(projection, nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class StaticNet(nn.Module):
    """A plain ResNet of one arch: what a subnet is when trained stand-alone."""

    def __init__(self, arch: Arch, shape: NetShape = NetShape()):
        super().__init__()
        self.arch, self.shape = arch, shape
        kernel, stride, pad, pool = _stem_geometry(shape)
        stem = stem_channels(arch, shape)
        self.conv1 = nn.Conv2d(shape.in_channels, stem, kernel, stride, pad, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.maxpool = nn.MaxPool2d(3, 2, 1) if pool else nn.Identity()
        blocks = blocks_of(arch, shape)
        self.blocks = nn.Sequential(*(BasicBlock(b.cin, b.mid, b.cout, b.stride) for b in blocks))
        self.fc = nn.Linear(feature_width(arch, shape), shape.num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.maxpool(F.relu(self.bn1(self.conv1(x)))))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return classify(self.features(x), self.fc.weight, self.fc.bias)


def _copy_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d, src: SlicedConvBN):
    o, i = conv.weight.shape[:2]
    conv.weight.copy_(src.weight[:o, :i])
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(bn, name).copy_(getattr(src.bn, name)[:o])
    bn.num_batches_tracked.copy_(src.bn.num_batches_tracked)


@torch.no_grad()
def extract_subnet(supernet: Supernet, arch: Arch) -> StaticNet:
    """A static network of `arch` holding copies of the supernet's sliced weights."""
    net = StaticNet(arch, supernet.shape).to(supernet.fc.weight.device)
    _copy_conv_bn(net.conv1, net.bn1, supernet.stem)
    for b, dst in zip(blocks_of(arch, supernet.shape), net.blocks):
        src = supernet.stages[b.stage][b.index]
        _copy_conv_bn(dst.conv1, dst.bn1, src.conv1)
        _copy_conv_bn(dst.conv2, dst.bn2, src.conv2)
        if dst.downsample is not None:
            _copy_conv_bn(dst.downsample[0], dst.downsample[1], src.shortcut)
    net.fc.weight.copy_(supernet.fc.weight[:, :net.fc.in_features])
    net.fc.bias.copy_(supernet.fc.bias)
    return net.train(supernet.training)


def count_flops_params(net_or_arch, shape: NetShape = NetShape()) -> tuple[int, int]:
    """(FLOPs of one forward pass on one image of `shape`, parameter count), by FlopCounterMode.

    An Arch is built as a StaticNet on the meta device, so counting costs no real compute.
    FLOPs are FlopCounterMode's: 2 per multiply-accumulate of the convs and the linear layer.
    """
    if isinstance(net_or_arch, Arch):
        with torch.device("meta"):
            net = StaticNet(net_or_arch, shape)
    else:
        net = net_or_arch
    p = next(net.parameters())
    size = shape.image_size
    x = torch.zeros(1, shape.in_channels, size, size, device=p.device, dtype=p.dtype)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net.eval()(x)
    return counter.get_total_flops(), sum(q.numel() for q in net.parameters())


@lru_cache(maxsize=65536)
def size_of(arch: Arch, shape: NetShape = NetShape()) -> tuple[int, int]:
    """`count_flops_params(arch, shape)` by arithmetic instead of running the net: the same
    two numbers (a test holds them equal), a thousand times faster, for the search, which
    sizes every candidate. FLOPs are 2 per multiply-accumulate of the convs and the linear
    layer; parameters include BN's weight and bias."""
    kernel, stride, pad, pool = _stem_geometry(shape)
    size = (shape.image_size + 2 * pad - kernel) // stride + 1
    stem = stem_channels(arch, shape)
    flops = 2 * shape.in_channels * stem * kernel * kernel * size * size
    params = shape.in_channels * stem * kernel * kernel + 2 * stem
    if pool:
        size = (size - 1) // 2 + 1
    for b in blocks_of(arch, shape):
        out = (size - 1) // b.stride + 1
        flops += 2 * 9 * (b.cin * b.mid + b.mid * b.cout) * out * out
        params += 9 * (b.cin * b.mid + b.mid * b.cout) + 2 * (b.mid + b.cout)
        if b.stride != 1 or b.cin != b.cout:
            flops += 2 * b.cin * b.cout * out * out
            params += b.cin * b.cout + 2 * b.cout
        size = out
    width = feature_width(arch, shape)
    flops += 2 * width * shape.num_classes
    params += (width + 1) * shape.num_classes
    return flops, params


# ---------------------------------------------------------------- the challenge's files

# The challenge's 45,000 candidate archs (CVPR_2022_NAS_Track1_test.json, gzip-compressed):
# what `nas.py evaluate --archs` fills in, and what CPT and SSE walk at the `paper` preset.
CHALLENGE_CANDIDATES = (Path(__file__).resolve().parent / "archs"
                        / "CVPR_2022_NAS_Track1_test.json.gz")


def read_challenge(path) -> dict[str, str]:
    """{name: 52-character code} from a challenge-format file, `{"archN": {"acc": .., "arch":
    code}}`, plain or gzip-compressed (.gz); ValueError naming the file or the entry."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        entries = json.loads(gzip.decompress(raw) if path.suffix == ".gz" else raw)
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}")
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
            codes[name] = encode(decode(code))
        except ValueError as e:
            raise ValueError(f"{path}: entry {name!r}: {e}")
    return codes


def read_candidates(path) -> tuple[Arch, ...]:
    """The archs of a challenge-format file, each once, in the file's order."""
    return tuple(decode(c) for c in dict.fromkeys(read_challenge(path).values()))


# ---------------------------------------------------------------- pretrained weights

# The challenge's pretrained ResNet-48 (`resnet48.pdparams`, the demo's download) names its
# layers after the demo's hnas/models/resnet.py: `blocks.0` the stem (conv, bn), `blocks.1` ..
# `blocks.23` the BasicBlocks in order (conv1, bn1, conv2, bn2; downsample.0 conv and
# downsample.1 BN on the first block of stages 2-4), `blocks.24` the head (fc). Paddle keeps
# BN's statistics as `_mean` and `_variance`, and a Linear's weight as [in, out].
PADDLE_BN = {"weight": "weight", "bias": "bias", "_mean": "running_mean",
             "_variance": "running_var"}
NUMPY_ARRAYS = {("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict"),
                ("numpy.core.multiarray", "_reconstruct"),
                ("numpy._core.multiarray", "_reconstruct")}


def paddle_names(shape: NetShape) -> dict[str, str]:
    """{name in the challenge's .pdparams: name in StaticNet(MAX_ARCH)} for every tensor."""
    names = {"blocks.0.conv.weight": "conv1.weight"}
    names.update({f"blocks.0.bn.{p}": f"bn1.{o}" for p, o in PADDLE_BN.items()})
    blocks = blocks_of(MAX_ARCH, shape)
    for i, b in enumerate(blocks):
        src, dst = f"blocks.{i + 1}", f"blocks.{i}"
        for conv, bn in (("conv1", "bn1"), ("conv2", "bn2")):
            names[f"{src}.{conv}.weight"] = f"{dst}.{conv}.weight"
            names.update({f"{src}.{bn}.{p}": f"{dst}.{bn}.{o}" for p, o in PADDLE_BN.items()})
        if b.stride != 1 or b.cin != b.cout:
            names[f"{src}.downsample.0.weight"] = f"{dst}.downsample.0.weight"
            names.update({f"{src}.downsample.1.{p}": f"{dst}.downsample.1.{o}"
                          for p, o in PADDLE_BN.items()})
    head = f"blocks.{len(blocks) + 1}.fc"
    names.update({f"{head}.weight": "fc.weight", f"{head}.bias": "fc.bias"})
    return names


class _ArraysOnly(pickle.Unpickler):
    """Unpickles numpy arrays in plain containers and nothing else: a pickle can run any code
    it names, and a weights file has no reason to name any."""

    def find_class(self, module, name):
        if (module, name) in NUMPY_ARRAYS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which a weights file need not")


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_largest_net(path, shape: NetShape) -> dict[str, torch.Tensor]:
    """The largest net's weights from `path` under StaticNet(MAX_ARCH, shape)'s names.

    `path` is the challenge's `resnet48.pdparams` (what paddle.save writes for a state dict: a
    pickle of name -> numpy array, plus a `StructuredToParameterName@@` entry; read here
    without Paddle), or a PyTorch file: a StaticNet state dict of the largest arch, or the
    net.pt that `nas.py export` writes of it. ValueError, in one line, for anything else and for
    a tensor whose shape is not the net's at `shape`.
    """
    path = Path(path)
    try:
        if zipfile.is_zipfile(path):  # torch.save's format
            blob = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(blob, dict) and "state_dict" in blob:
                if blob.get("code") != MAX_CODE:
                    raise ValueError(f"{path} holds arch {blob.get('code')}, not the largest")
                blob = blob["state_dict"]
            kind, names = "a PyTorch state dict", None
        else:
            with open(path, "rb") as f:
                blob = _ArraysOnly(f).load()
            kind, names = "a Paddle .pdparams", paddle_names(shape)
    except (OSError, pickle.UnpicklingError, EOFError, RuntimeError, TypeError) as e:
        raise ValueError(f"{path} is neither the challenge's .pdparams nor a PyTorch state dict "
                         f"of the largest net ({type(e).__name__}: {e})".splitlines()[0])
    if not isinstance(blob, dict):
        raise ValueError(f"{path} holds a {type(blob).__name__}, not a state dict")
    with torch.device("meta"):
        expected = {k: v.shape for k, v in StaticNet(MAX_ARCH, shape).state_dict().items()}
    weights = {}
    for name, value in blob.items():
        if names is not None:
            if name not in names:
                continue  # StructuredToParameterName@@, and anything the net does not hold
            name = names[name]
            value = torch.from_numpy(value.copy())
            if name == "fc.weight":
                value = value.T  # Paddle's Linear is [in, out]
        if isinstance(value, torch.Tensor) and name in expected:
            weights[name] = value.float() if value.is_floating_point() else value
    for name, size in expected.items():
        if name.endswith("num_batches_tracked"):
            weights.setdefault(name, torch.zeros((), dtype=torch.long))
        elif name not in weights:
            raise ValueError(f"{path} ({kind}) has no weight for {name} of the largest net")
        elif weights[name].shape != size:
            raise ValueError(f"{path}: {name} is {list(weights[name].shape)}, the preset's "
                             f"largest net needs {list(size)}")
    return {k: weights[k].contiguous() for k in expected}


def supernet_names(shape: NetShape) -> dict[str, str]:
    """{name in StaticNet(MAX_ARCH): name in Supernet} for every tensor: the largest arch uses
    all of every supernet layer."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    names = {"conv1.weight": "stem.weight", **{f"bn1.{p}": f"stem.bn.{p}" for p in bn},
             "fc.weight": "fc.weight", "fc.bias": "fc.bias"}
    for i, b in enumerate(blocks_of(MAX_ARCH, shape)):
        src, dst = f"blocks.{i}", f"stages.{b.stage}.{b.index}"
        pairs = [("conv1", "bn1", "conv1"), ("conv2", "bn2", "conv2")]
        if b.stride != 1 or b.cin != b.cout:
            pairs.append(("downsample.0", "downsample.1", "shortcut"))
        for conv, norm, sliced in pairs:
            names[f"{src}.{conv}.weight"] = f"{dst}.{sliced}.weight"
            names.update({f"{src}.{norm}.{p}": f"{dst}.{sliced}.bn.{p}" for p in bn})
    return names


@torch.no_grad()
def load_largest(net: Supernet, weights: dict[str, torch.Tensor]) -> None:
    """Start the supernet from a largest net's weights (StaticNet(MAX_ARCH) names): the inverse
    of `extract_subnet`, every tensor whole."""
    names = supernet_names(net.shape)
    net.load_state_dict({names[k]: v for k, v in weights.items()})
