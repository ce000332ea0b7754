"""What each idea of the papers does to the supernet, measured without any ground truth.

    python bench/mechanisms.py --preset tiny      # minutes on 2 CPU cores
    python bench/mechanisms.py --preset small

The APS/CPT/SSE paper's only evidence is Pearson against a hidden ground truth; its
explanations (shallow stage 4 underestimated under PS, CPT against multi-model forgetting, SSE
enhancing underestimated subnets) are asserted, and Π-NAS's two shifts are named, not measured.
Each diagnostic here tests whether a mechanism does its job on the supernet itself:

1. interference: gradient cosine of two subnets on their shared weights, and two-model
   forgetting, PS against compute-matched SPOS;
2. forgetting under CPT: no pool, a random pool and CPT's pool from one APS_v3 checkpoint;
3. underestimation: the recovery gain of each probe arch over (stage-3, stage-4 depth), after
   PS, APS_v3, +CPT, +SSE34 and SSE34's budget-matched control (one unsplit copy);
4. Π-NAS: feature shift and parameter shift of the student, against a same-path control;
5. rank stability: Kendall tau between consecutive rankings of the probe set within a stage.

The supernets are the ablation's chain checkpoints (bench/ablation.py trains what is missing,
in runs/ablation-<preset>/). Every number carries its noise floor: the same measurement on a
second batch or a second calibration subset; means over archs carry bootstrap intervals.
Writes bench/results/mechanisms-<preset>.json and .md, and one PNG per diagnostic.
"""

import json
import math
import random
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import replace
from datetime import date
from pathlib import Path

import numpy as np
import scipy.stats
import torch
import torch.nn.functional as F
import typer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import ablation  # noqa: E402
import evaluate  # noqa: E402
import events  # noqa: E402
import pinas  # noqa: E402
import presets  # noqa: E402
import report  # noqa: E402
import train_stages as stages  # noqa: E402
import supernet  # noqa: E402
import trainer  # noqa: E402
from data import load_data  # noqa: E402
from train_stages import ConstraintPool  # noqa: E402
from presets import autocast, bn_momentum  # noqa: E402

CELLS = [(d3, d4) for d3 in range(2, 9) for d4 in range(2, 6)]   # 7 x 4 (stage-3, stage-4 depth)
SMALLEST = supernet.Arch((2, 2, 2, 2), (3, 3, 5, 7), ((3,) * 2, (3,) * 2, (5,) * 2, (7,) * 2))
# How much of each measurement a preset affords: probe archs per cell, held-out images per
# probe batch, calibration batches, (largest, uniform) pairs, CPT-arm steps and forgetting
# window, the batch of the diagnostics' own training steps, recovery steps, Π-NAS steps,
# rank probes per stage.
SIZES = {"tiny": dict(per_cell=1, probe_images=128, calib_batches=1, pairs=10, cpt_steps=100,
                      window=20, train_batch=16, recovery_steps=15, pinas_steps=50,
                      stability_probes=2),
         "small": dict(per_cell=2, probe_images=500, calib_batches=2, pairs=10, cpt_steps=100,
                       window=20, train_batch=64, recovery_steps=15, pinas_steps=50,
                       stability_probes=3)}


# ---------------------------------------------------------------- the fixed probe

class Probe:
    """The fixed, seeded measurement set: one or two archs in each (d3, d4) cell, two held-out
    batches (the second for noise floors), two calibration subsets, a training stream."""

    def __init__(self, data, preset: presets.Preset, per_cell: int, images: int, seed: int = 0,
                 train_batch: int = 32, calib_batches: int = 1):
        rng = random.Random(seed)
        self.archs = [supernet.sample_arch(rng, ((2, 5), (2, 5), (d3, d3), (d4, d4)))
                      for d3, d4 in CELLS for _ in range(per_cell)]
        self.data, self.preset, self.train_batch_size = data, preset, train_batch
        x, y = data.test_x, data.test_y
        self.batch = (data.normalize(x[:images]), y[:images])
        self.batch2 = (data.normalize(x[images:2 * images]), y[images:2 * images])
        n, size = calib_batches, preset.calib_batch_size
        self.calib = data.calib_batches(n, size, seed=3)
        self.calib2 = data.calib_batches(n, size, seed=4)

    def train_batch(self, step: int, key: int = 99):
        return self.data.train_batch(key, step, self.train_batch_size)


@torch.no_grad()
def inherited(net, arch, calib, batch) -> tuple[float, float]:
    """(loss, top-1) of `arch` (None: a static net) on `batch`, BN recalibrated on `calib`."""
    evaluate.calibrate_bn(net, arch, calib)
    x, y = batch
    with autocast(x.device):
        logits = net(x) if arch is None else net(x, arch)
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


@torch.no_grad()
def batch_stat_loss(net, arch, batch) -> float:
    """`arch`'s loss on `batch` with BN normalizing by the batch's own statistics, as in
    training, and the running statistics untouched: a measurement cheap enough for every step."""
    x, y = batch
    net.train()
    with bn_momentum(net, 0.0), autocast(x.device):
        return F.cross_entropy(net(x, arch), y).item()


def mean_ci(values, seed: int = 0) -> dict:
    """Mean with a 95% bootstrap interval (percentile), and n."""
    v = np.asarray(values, float)
    out = {"mean": float(v.mean()), "n": len(v)}
    if len(v) > 2 and v.std() > 0:
        boot = scipy.stats.bootstrap((v,), np.mean, n_resamples=1000, method="percentile",
                                     **report.bootstrap_seed(seed))
        out["ci"] = [float(boot.confidence_interval.low), float(boot.confidence_interval.high)]
    return out


def snapshot(net) -> dict:
    return {k: v.clone() for k, v in net.state_dict().items()}


# ---------------------------------------------------------------- 1. interference

def path_gradient(net, arch, batch) -> dict:
    """Gradients of `arch`'s loss on `batch` (batch-statistics BN, running ones untouched)."""
    x, y = batch
    net.train()
    net.zero_grad(set_to_none=True)
    with bn_momentum(net, 0.0), autocast(x.device):
        loss = F.cross_entropy(net(x, arch), y)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in net.named_parameters() if p.grad is not None}
    net.zero_grad(set_to_none=True)
    return grads


def used_masks(net, arch) -> dict:
    """{parameter name: 0/1 mask of the entries `arch` runs}: its conv and BN slices and its
    classifier columns (pinas.used_slices: the one walk over an arch's slices)."""
    params = dict(net.named_parameters())
    masks = {n: torch.zeros_like(p) for n, p in params.items()}
    for name, cout, cin in pinas.used_slices(net, arch):
        masks[f"{name}.weight"][:cout, :cin] = 1
        masks[f"{name}.bn.weight"][:cout] = 1
        masks[f"{name}.bn.bias"][:cout] = 1
    masks["fc.weight"][:, :supernet.feature_width(arch, net.shape)] = 1
    masks["fc.bias"][:] = 1
    return masks


def shared_cosine(ga: dict, gb: dict, ma: dict, mb: dict) -> float:
    """Cosine of two gradients over the weights both archs run."""
    a, b = [], []
    for n in ga.keys() & gb.keys():
        m = (ma[n] * mb[n]).bool()
        a.append(ga[n][m])
        b.append(gb[n][m])
    a, b = torch.cat(a).double(), torch.cat(b).double()
    return float(F.cosine_similarity(a, b, dim=0))


# Below this self-cosine the largest arch's gradients on two batches are close to orthogonal (a
# trained net: at small, 0.17 after PS and -0.005 after SPOS), and dividing by it blows up.
MIN_SELF_COSINE = 0.1


def interference(net, probe: Probe, pairs: int, seed: int = 0) -> dict:
    """Gradient interference between subnets, after Xu et al., "Analyzing and Mitigating
    Interference in Neural Architecture Search" (ICML 2022): the cosine of the gradients two
    subnets give the weights they share, on one batch. Our reading: "shared" is the
    intersection of their slices; each cosine is divided by the largest arch's cosine with
    itself across two batches (how much one arch agrees with itself: the unit of agreement).
    Pairs: (largest, smallest) and `pairs` (largest, uniform) archs; the same on the second
    batch is the noise floor. The raw cosines are kept beside the ratios, which are None where
    the self-cosine is under MIN_SELF_COSINE."""
    rng = random.Random(seed)
    big = supernet.MAX_ARCH
    others = [SMALLEST] + [supernet.sample_arch(rng) for _ in range(pairs)]
    mask_big = used_masks(net, big)
    out = {}
    for label, batch in (("batch", probe.batch), ("second batch", probe.batch2)):
        g_big = path_gradient(net, big, batch)
        cosines = [shared_cosine(g_big, path_gradient(net, a, batch), mask_big, used_masks(net, a))
                   for a in others]
        out[label] = cosines
    self_cos = shared_cosine(path_gradient(net, big, probe.batch),
                             path_gradient(net, big, probe.batch2), mask_big, mask_big)
    raw = {"raw_largest_smallest": out["batch"][0],
           "raw_largest_uniform": mean_ci(out["batch"][1:]),
           "raw_floor_largest_uniform": mean_ci(out["second batch"][1:]),
           "raw": out["batch"], "raw_second_batch": out["second batch"],
           "self_cosine_across_batches": self_cos}
    if self_cos < MIN_SELF_COSINE:  # no unit: a ratio would be noise over noise
        return {**raw, "largest_smallest": None, "largest_uniform": None,
                "floor_largest_uniform": None}
    ratios = [c / self_cos for c in out["batch"]]
    return {**raw, "largest_smallest": ratios[0], "largest_uniform": mean_ci(ratios[1:]),
            "floor_largest_uniform": mean_ci([c / self_cos for c in out["second batch"][1:]])}


def sgd_steps(net, archs_at, probe: Probe, lr: float, steps: int) -> None:
    """`steps` SGD steps (momentum 0.9, the supernet's weight decay) on the probe's training
    stream, each on the archs `archs_at(step)` returns, their gradients summed."""
    opt = trainer.make_optimizer(net.parameters(), lr)
    net.train()
    for t in range(steps):
        x, y = probe.train_batch(t)
        opt.zero_grad(set_to_none=True)
        for arch in archs_at(t):
            with autocast(x.device):
                F.cross_entropy(net(x, arch), y).backward()
        opt.step()


def two_model_forgetting(net, probe: Probe, lr: float, steps: int = 20, seed: int = 0) -> dict:
    """Two-model forgetting, after Benyahia et al., "Overcoming Multi-Model Forgetting" (ICML
    2019): train only one kind of subnet and measure how much another loses. Our reading: 20
    steps on depth-2 archs (every stage at 2 blocks), then the largest net's loss change on the
    probe batch (BN recalibrated both times); and the reverse, 20 steps on the largest net and
    the mean loss change of 3 depth-2 archs. The weights are restored after each."""
    rng = random.Random(seed)
    judged = [supernet.sample_arch(rng, ((2, 2),) * 4) for _ in range(3)]
    shallow = judged + [supernet.sample_arch(rng, ((2, 2),) * 4) for _ in range(steps - 3)]
    saved = snapshot(net)
    out = {}
    for label, trained, measured in (("largest after depth-2 training", lambda t: [shallow[t]],
                                      [supernet.MAX_ARCH]),
                                     ("depth-2 after largest training",
                                      lambda t: [supernet.MAX_ARCH], judged)):
        for batch_label, batch in (("batch", probe.batch), ("second batch", probe.batch2)):
            before = [inherited(net, a, probe.calib, batch)[0] for a in measured]
            sgd_steps(net, trained, probe, lr, steps)
            after = [inherited(net, a, probe.calib, batch)[0] for a in measured]
            net.load_state_dict(saved)
            out.setdefault(label, {})[batch_label] = statistics.mean(
                b - a for a, b in zip(before, after))
    return out


# ---------------------------------------------------------------- 2. forgetting under CPT

def forgetting_under_cpt(net, probe: Probe, lr: float, steps: int, window: int,
                         seed: int = 0, pool_size: int = 10) -> dict:
    """Multi-model forgetting under three regularisers, from one APS_v3 checkpoint: no pool
    (CE of the sampled arch), 10 fresh uniform archs a step (the compute-matched control of
    NSAS's NAS-Bench-201 code), and CPT's pool as the stage runs it (train_stages.cpt_step:
    refilled with uniform archs where the preset's CPT refills it, NSAS's rule in between);
    the same data order and the same sampled archs in every arm, `steps` steps at CPT's lr (a
    pool of `pool_size`, CPT's 10). Forgetting as in Benyahia et al.'s code: an arch's loss
    on the probe batch right after it trained against the same `window` steps later
    (batch-statistics BN: cheap enough for every step; our reading); its floor, the mean
    absolute difference of the same forgetting read on the second batch. Probe archs are
    split into near and far from the pool by their Eq.-2 distance to its nearest member when
    they trained (cut at the median over the pool arms)."""
    rng = random.Random(seed)
    sampled = [supernet.sample_arch(rng) for _ in range(steps)]
    randoms = [[supernet.sample_arch(rng) for _ in range(pool_size)] for _ in range(steps)]
    cpt = stages.stage_phases("cpt", probe.preset)[0]
    cpt_steps = stages.phase_length(cpt, probe.preset, probe.data.train_size)
    refills = {t: [supernet.sample_arch(rng) for _ in range(pool_size)] for t in range(steps)
               if stages.refills_pool(t, cpt_steps, cpt.paper_epochs)}
    saved = snapshot(net)
    arms, gaps = {}, []
    for arm in ("no pool", "random pool", "CPT pool"):
        pool = ConstraintPool(size=pool_size, k=pool_size - 1)
        opt = trainer.make_optimizer(net.parameters(), lr)
        after, later, after2, later2 = {}, {}, {}, {}
        distance, turnover, diversity = {}, 0, []
        for t in range(steps):
            x, y = probe.train_batch(t)
            arch = sampled[t]
            if arm == "CPT pool":
                if t in refills:
                    pool.refill(refills[t])
                full, before = len(pool.members) == pool.size, set(pool.members)
                pool.update(arch)
                turnover += full and set(pool.members) != before  # a member was replaced
                members = pool.members
            else:
                members = randoms[t] if arm == "random pool" else []
            if members:
                distance[t] = float(supernet.distances([arch], members).min())
                diversity.append(pool.stats()["mean_dist"] if arm == "CPT pool" else
                                 float(supernet.distances(members, members).sum()
                                       / (len(members) * (len(members) - 1))))
            net.train()
            opt.zero_grad(set_to_none=True)
            with autocast(x.device):
                loss = F.cross_entropy(net(x, arch), y)
                if members:
                    pool_loss = sum(F.cross_entropy(net(x, m), y) for m in members) / len(members)
                    loss = 0.5 * loss + 0.5 * pool_loss
            loss.backward()
            opt.step()
            after[t] = batch_stat_loss(net, arch, probe.batch)
            after2[t] = batch_stat_loss(net, arch, probe.batch2)
            if t >= window:
                later[t - window] = batch_stat_loss(net, sampled[t - window], probe.batch)
                later2[t - window] = batch_stat_loss(net, sampled[t - window], probe.batch2)
        net.load_state_dict(saved)
        forgetting = {t: later[t] - after[t] for t in later}
        gaps += [abs(forgetting[t] - (later2[t] - after2[t])) for t in later]
        arms[arm] = {"forgetting": forgetting, "distance": distance,
                     "turnover_per_100_steps": 100 * turnover / steps if arm == "CPT pool"
                     else None,
                     "pool_mean_distance": statistics.mean(diversity) if diversity else None}
    cut = statistics.median(d for a in arms.values() for d in a["distance"].values())
    out = {"distance_cut": cut}
    for arm, r in arms.items():
        f = list(r["forgetting"].values())
        row = {"mean": mean_ci(f), "max": max(f), "std": statistics.stdev(f),
               "pool_mean_distance": r["pool_mean_distance"],
               "turnover_per_100_steps": r["turnover_per_100_steps"]}
        if r["distance"]:
            for side, keep in (("near", lambda d: d <= cut), ("far", lambda d: d > cut)):
                part = [r["forgetting"][t] for t in r["forgetting"] if keep(r["distance"][t])]
                row[side] = mean_ci(part) if part else None
        out[arm] = row
    # the noise floor: how much the same forgetting differs when read on the second batch
    out["floor"] = statistics.mean(gaps)
    return out


# ---------------------------------------------------------------- 3. underestimation

def recovery_gains(st, probe: Probe, lr: float, steps: int) -> dict:
    """How far the supernet's weights are from what each probe arch wants: its inherited loss
    minus its loss after `steps` steps of training it alone, on a copy (the extracted static
    net), at `lr`; BN recalibrated both times. A large gain says the arch was underestimated.
    The same on the second batch and calibration subset is the noise floor. With SSE, each
    arch's own copy. Our reading of "at the stage's last lr": one lr for every variant, CPT's
    (the smallest of the method), so that the gains compare across variants; at each run's own
    last-phase lr (3-4x larger) 15 steps raised almost every arch's loss at tiny (mean gain
    -0.31 after PS, measured 2026-12-03), a measure of the steps' noise, not of the weights."""
    out = {}
    for arch in probe.archs:
        code = supernet.encode(arch)
        with st.sse.holding(st.net, st.sse.owner(arch)) if st.sse else nullcontext():
            before = [inherited(st.net, arch, c, b)[0]
                      for c, b in ((probe.calib, probe.batch), (probe.calib2, probe.batch2))]
            static = supernet.extract_subnet(st.net, arch)
        opt = trainer.make_optimizer(static.parameters(), lr)
        static.train()
        for t in range(steps):
            x, y = probe.train_batch(t, key=123)
            opt.zero_grad(set_to_none=True)
            with autocast(x.device):
                F.cross_entropy(static(x), y).backward()
            opt.step()
        after = [inherited(static, None, c, b)[0]
                 for c, b in ((probe.calib, probe.batch), (probe.calib2, probe.batch2))]
        out[code] = {"cell": [arch.depths[2], arch.depths[3]], "gain": before[0] - after[0],
                     "gain_second": before[1] - after[1], "inherited_loss": before[0]}
    return out


def cell_map(gains: dict, key: str = "gain") -> list[list[float]]:
    """7 x 4 mean of `key` per (d3, d4) cell (rows d3 = 2..8, columns d4 = 2..5)."""
    grid = [[[] for _ in range(4)] for _ in range(7)]
    for g in gains.values():
        d3, d4 = g["cell"]
        grid[d3 - 2][d4 - 2].append(g[key])
    return [[statistics.mean(c) if c else math.nan for c in row] for row in grid]


def region_offsets(st, probe: Probe) -> dict:
    """SSE's scale mismatch: per region, the mean of (loss, top-1) with the arch's own
    sub-supernet minus the same with the shared copy, for the probe archs of that region."""
    out = {}
    for region in range(st.sse.shared):
        archs = [a for a in probe.archs if st.sse.owner(a) == region]
        own, shared = [], []
        for arch in archs:
            with st.sse.holding(st.net, region):
                own.append(inherited(st.net, arch, probe.calib, probe.batch))
            with st.sse.holding(st.net, st.sse.shared):
                shared.append(inherited(st.net, arch, probe.calib, probe.batch))
        out[str(region)] = {"n": len(archs),
                            "loss": mean_ci([o[0] - s[0] for o, s in zip(own, shared)]),
                            "top1": mean_ci([o[1] - s[1] for o, s in zip(own, shared)])}
    return out


# ---------------------------------------------------------------- 4. Π-NAS's two shifts

@torch.no_grad()
def stage_inputs(net, x, arch) -> dict:
    """The inputs of stages 2-4 and the pooled features of `arch` on `x` (the walk of
    Supernet.features, keeping what each stage receives)."""
    h = F.relu(net.stem(x, supernet.stem_channels(arch, net.shape)))
    if net.pool:
        h = F.max_pool2d(h, 3, 2, 1)
    sites = {}
    for b in supernet.blocks_of(arch, net.shape):
        if b.index == 0 and b.stage > 0:
            sites[f"stage {b.stage + 1} input"] = h.float()
        h = net.stages[b.stage][b.index](h, b.mid, b.cout)
    sites["pooled"] = torch.flatten(F.adaptive_avg_pool2d(h, 1), 1).float()
    return sites


def channel_shift(a: torch.Tensor, b: torch.Tensor) -> float:
    """How far two activations' per-channel distributions are apart, over the channels both
    have: the mean over channels of |mean_a - mean_b| / pooled std + |log std_a - log std_b|."""
    c = min(a.shape[1], b.shape[1])
    dims = [0] + list(range(2, a.dim()))
    ma, mb = a[:, :c].mean(dims), b[:, :c].mean(dims)
    sa, sb = a[:, :c].std(dims) + 1e-5, b[:, :c].std(dims) + 1e-5
    pooled = ((sa ** 2 + sb ** 2) / 2).sqrt()
    return float(((ma - mb).abs() / pooled).mean() + (sa.log() - sb.log()).abs().mean())


def feature_shift(net, probe: Probe, pairs: int = 16, seed: int = 0) -> dict:
    """Π-NAS's feature shift (Peng et al., ICCV 2021, Sec. 3): the input distribution of a hidden
    layer varying with the path sampled before it. For `pairs` path pairs (sample_path_pair:
    different in every choice), each with BN recalibrated for its path, the channel shift of
    the inputs of stages 2-4 and of the pooled features on the probe batch, and 1 - the mean
    cosine of the pooled features over the channels both have. Floors: the same path on the
    second batch (channel shift) and recalibrated on the second calibration subset (cosine)."""
    rng = random.Random(seed)
    x, x2 = probe.batch[0], probe.batch2[0]
    shift, floor, cos, cos_floor = {}, {}, [], []
    for _ in range(pairs):
        a, b = pinas.sample_path_pair(rng)
        evaluate.calibrate_bn(net, a, probe.calib)
        fa, fa2 = stage_inputs(net, x, a), stage_inputs(net, x2, a)
        evaluate.calibrate_bn(net, a, probe.calib2)
        fa_other_calib = stage_inputs(net, x, a)["pooled"]
        evaluate.calibrate_bn(net, b, probe.calib)
        fb = stage_inputs(net, x, b)
        for site in fa:
            shift.setdefault(site, []).append(channel_shift(fa[site], fb[site]))
            floor.setdefault(site, []).append(channel_shift(fa[site], fa2[site]))
        c = min(fa["pooled"].shape[1], fb["pooled"].shape[1])
        cos.append(1 - float(F.cosine_similarity(fa["pooled"][:, :c], fb["pooled"][:, :c]).mean()))
        cos_floor.append(1 - float(F.cosine_similarity(fa["pooled"], fa_other_calib).mean()))
    return {"channel_shift": {s: mean_ci(v) for s, v in shift.items()},
            "channel_shift_floor": {s: mean_ci(v) for s, v in floor.items()},
            "one_minus_cosine": mean_ci(cos), "one_minus_cosine_floor": mean_ci(cos_floor)}


def common_slices(net) -> list[tuple[str, int, int]]:
    """The weights every path runs: the stem's and each stage's first conv's slice at the
    narrowest widths the space allows (the smallest arch's)."""
    first = [b for b in supernet.blocks_of(SMALLEST, net.shape) if b.index == 0]
    return ([("stem.weight", supernet.stem_channels(SMALLEST, net.shape), net.shape.in_channels)]
            + [(f"stages.{b.stage}.0.conv1.weight", b.mid, b.cin) for b in first])


def coherence(steps: list[torch.Tensor]) -> float:
    """|sum of the steps| / sum of |each step|: 1 when they all point one way, about
    1/sqrt(n) for n independent directions (a random walk)."""
    return float(torch.stack(steps).sum(0).norm() / sum(g.norm() for g in steps))


def parameter_shift(st, probe: Probe, steps: int, cross_path: bool, paths: int = 8) -> dict:
    """Π-NAS's parameter shift (Sec. 3): contradictory updates of the weights every path
    shares, from step to step. The student trains `steps` more Π-NAS steps from the checkpoint
    (a fresh teacher and queue, our reading: the checkpoint of a finished stage keeps neither;
    the phase's first lr, held), and on the common slices we take: the mean cosine of
    consecutive steps' gradients; |sum of gradients| / sum of |gradients| (1: consistent,
    1/sqrt(steps): a random walk); and the variance of the gradient over `paths` path pairs on
    one batch relative to its squared mean (on the second batch: the floor). The student's
    weights are restored afterwards."""
    net, saved = st.net, snapshot(st.net)
    phase = stages.stage_phases("pinas", st.preset)[0]
    st.pinas = pinas.PiNAS(net, st.preset.queue_size, st.seed, cross_path)
    names = common_slices(net)
    params = dict(net.named_parameters())
    pixels = (probe.data.mean, probe.data.std)
    opt = trainer.make_optimizer([*net.parameters(), *st.pinas.projector.parameters()], phase.lr,
                                 pinas.WEIGHT_DECAY)

    def common_gradient() -> torch.Tensor:
        return torch.cat([params[n].grad[:o, :i].flatten() for n, o, i in names])

    grads = []
    net.train()
    for t in range(steps):
        st.step = t
        x, _ = probe.train_batch(t)
        opt.zero_grad(set_to_none=True)
        archs, _ = stages.pinas_step(st, phase, x, pixels)
        grads.append(common_gradient().clone())
        opt.step()
        st.pinas.update_teacher(net, archs)
    consecutive = [float(F.cosine_similarity(a, b, dim=0)) for a, b in zip(grads, grads[1:])]
    variance = {}
    for label, batch in (("batch", probe.batch), ("second batch", probe.batch2)):
        per_path = []
        for i in range(paths):
            opt.zero_grad(set_to_none=True)
            g = torch.Generator().manual_seed(17)  # the same views for every pair
            st.pinas.step(net, batch[0], pixels, random.Random(i), g)
            per_path.append(common_gradient().clone())
        stacked = torch.stack(per_path)
        mean = stacked.mean(0)
        variance[label] = float((stacked - mean).pow(2).sum(1).mean() / mean.pow(2).sum())
    opt.zero_grad(set_to_none=True)
    net.load_state_dict(saved)
    st.pinas = None
    return {"consecutive_cosine": mean_ci(consecutive), "coherence": coherence(grads),
            "random_walk_coherence": 1 / math.sqrt(steps),
            "path_variance": variance["batch"], "path_variance_floor": variance["second batch"]}


# ---------------------------------------------------------------- 5. rank stability

def rank_stability(st, data, probe: Probe, probes_per_stage: int, log) -> dict:
    """How stable the supernet's ranking is during training, after Zhang et al., "Deeper
    Insights into Weight Sharing in Neural Architecture Search" (2020), who found the best
    model changing between consecutive epochs: the probe archs ranked (inherited top-1 on the
    probe batch) `probes_per_stage` times or more in every stage, and Kendall tau between
    consecutive rankings of the same stage. `st` goes on from its checkpoint to the end of its
    stages (a rerun of the chain, the only way to see inside a stage)."""
    lengths = {}
    for p in st.phases()[st.phase_index:]:
        lengths[p.stage] = lengths.get(p.stage, 0) + stages.phase_length(p, st.preset,
                                                                          data.train_size)
    every = max(1, round(statistics.median(lengths.values()) / probes_per_stage))
    st.preset = replace(st.preset, probe_every=every)
    x, y = probe.batch
    evals = [(x, y)]
    rankings = []

    def record(state):
        accs = evaluate.evaluate_archs(state.net, state.sse, probe.archs, probe.calib, evals)
        stage = state.phases()[min(state.phase_index, len(state.phases()) - 1)].stage
        rankings.append((stage, state.step, list(accs.values())))

    trainer.train(st, data, None, log, probe=record)
    out = consecutive_kendall(rankings)
    return {"probe_every": st.preset.probe_every,
            "consecutive_kendall": {s: {"values": v, **mean_ci(v)} for s, v in out.items()}}


def consecutive_kendall(rankings: list[tuple]) -> dict[str, list[float]]:
    """{stage: Kendall tau of each ranking with the next one of the same stage} from
    (stage, step, accuracies) in the order they were taken."""
    out = {}
    for (s1, _, a1), (s2, _, a2) in zip(rankings, rankings[1:]):
        if s1 == s2:
            out.setdefault(s1, []).append(float(scipy.stats.kendalltau(a1, a2).statistic))
    return out


# ---------------------------------------------------------------- pictures and the table

def _fmt(m) -> str:
    if m is None:
        return "-"
    if isinstance(m, dict):
        ci = m.get("ci")
        return f"{m['mean']:.4f}" + (f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "")
    return f"{m:.4f}"


def write_pictures(results: dict, out: Path, stem: str) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paths = []

    def save(fig, name, tight=True):  # a constrained layout places itself
        path = out / f"{stem}-{name}.png"
        if tight:
            fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)

    if "interference" in results:
        r = results["interference"]
        fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
        names = list(r)
        for i, v in enumerate(names):
            u = r[v]["cosine"]["raw_largest_uniform"]
            left.bar(i - 0.2, r[v]["cosine"]["raw_largest_smallest"], 0.4, color="tab:blue")
            left.bar(i + 0.2, u["mean"], 0.4, color="tab:orange",
                     yerr=[[u["mean"] - u.get("ci", [u["mean"]] * 2)[0]],
                           [u.get("ci", [u["mean"]] * 2)[1] - u["mean"]]])
            f = r[v]["forgetting"]
            right.bar(i - 0.2, f["largest after depth-2 training"]["batch"], 0.4,
                      color="tab:blue")
            right.bar(i + 0.2, f["depth-2 after largest training"]["batch"], 0.4,
                      color="tab:orange")
        left.set(xticks=range(len(names)), xticklabels=names,
                 title="gradient cosine on shared weights\n(blue: largest-smallest, "
                       "orange: largest-uniform)")
        right.set(xticks=range(len(names)), xticklabels=names,
                  title="loss change of the untrained kind\n(blue: largest, orange: depth-2)")
        save(fig, "interference")
    if "cpt" in results:
        r = results["cpt"]
        arms = [a for a in ("no pool", "random pool", "CPT pool") if a in r]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for i, arm in enumerate(arms):
            for j, side in enumerate(("mean", "near", "far")):
                m = r[arm].get(side)
                if m:
                    ax.bar(i + 0.27 * (j - 1), m["mean"], 0.25,
                           color=["tab:gray", "tab:green", "tab:red"][j],
                           label=side if i == len(arms) - 1 else None)
        ax.axhline(0, color="black", lw=0.5)
        ax.set(xticks=range(len(arms)), xticklabels=arms,
               title="forgetting: loss change 20 steps after an arch trained")
        ax.legend(fontsize=8)
        save(fig, "cpt")
    if "underestimation" in results:
        r = results["underestimation"]["maps"]
        fig, axes = plt.subplots(1, len(r), figsize=(2.5 * len(r) + 1, 3.6), squeeze=False,
                                 layout="constrained")
        top = np.nanmax(np.abs([m for m in r.values()]))
        for i, (ax, (v, grid)) in enumerate(zip(axes[0], r.items())):
            im = ax.imshow(grid, cmap="RdBu_r", vmin=-top, vmax=top, origin="lower",
                           extent=(1.5, 5.5, 1.5, 8.5), aspect="auto")
            ax.set(title=v, xlabel="stage-4 depth", ylabel="stage-3 depth" if i == 0 else None)
        fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8,
                     label="recovery gain (loss; red: underestimated)")
        save(fig, "underestimation", tight=False)
    if "pinas" in results:
        r = results["pinas"]
        fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
        sites = list(next(iter(r.values()))["feature"]["channel_shift"])
        for i, (v, m) in enumerate(r.items()):
            left.bar([k + 0.3 * i for k in range(len(sites))],
                     [m["feature"]["channel_shift"][s]["mean"] for s in sites], 0.3, label=v)
        floor = next(iter(r.values()))["feature"]["channel_shift_floor"]
        left.plot(range(len(sites)), [floor[s]["mean"] for s in sites], "k_", ms=20,
                  label="floor (same path, 2nd batch)")
        left.set(xticks=range(len(sites)), xticklabels=sites, title="feature shift")
        left.legend(fontsize=7)
        names = list(r)
        right.bar(range(len(names)), [r[v]["parameter"]["consecutive_cosine"]["mean"]
                                      for v in names])
        right.set(xticks=range(len(names)), xticklabels=names,
                  title="consecutive-gradient cosine (common slices)")
        save(fig, "pinas")
    if "stability" in results:
        r = results["stability"]["consecutive_kendall"]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for i, (s, m) in enumerate(r.items()):
            ax.scatter([i] * len(m["values"]), m["values"], s=12)
        ax.set(xticks=range(len(r)), xticklabels=list(r), ylim=(-1, 1),
               title="Kendall tau of consecutive rankings of the probe set")
        save(fig, "stability")
    return paths


def markdown(results: dict, preset: str, n_archs: int, seconds: dict) -> str:
    lines = [f"Mechanisms, preset {preset}, {date.today().isoformat()}, {n_archs} probe archs; "
             f"95% bootstrap intervals; seconds: {seconds}.", ""]
    if "interference" in results:
        lines += ["## 1. Interference (gradient cosine on the weights two subnets share)", "",
                  "| variant | largest-smallest | largest-uniform | floor (2nd batch) "
                  "| largest's self-cosine across batches | largest-uniform / self-cosine "
                  "| largest's loss change after depth-2 training | depth-2's after largest "
                  "training |", "|---|---|---|---|---|---|---|---|"]
        for v, r in results["interference"].items():
            c, f = r["cosine"], r["forgetting"]
            ratio = (_fmt(c["largest_uniform"]) if c["largest_uniform"] is not None
                     else f"- (self-cosine under {MIN_SELF_COSINE})")
            lines.append(f"| {v} | {c['raw_largest_smallest']:.4f} "
                         f"| {_fmt(c['raw_largest_uniform'])} "
                         f"| {_fmt(c['raw_floor_largest_uniform'])} "
                         f"| {c['self_cosine_across_batches']:.4f} | {ratio} "
                         f"| {f['largest after depth-2 training']['batch']:.4f} "
                         f"(2nd batch {f['largest after depth-2 training']['second batch']:.4f})"
                         f" | {f['depth-2 after largest training']['batch']:.4f} (2nd batch "
                         f"{f['depth-2 after largest training']['second batch']:.4f}) |")
        lines.append("")
    if "cpt" in results:
        r = results["cpt"]
        lines += ["## 2. Forgetting under CPT (loss change 20 steps after an arch trained)", "",
                  "| arm | mean | max | std | near the pool | far from it | pool mean "
                  "distance | turnover / 100 steps |", "|---|---|---|---|---|---|---|---|"]
        for arm in ("no pool", "random pool", "CPT pool"):
            a = r[arm]
            lines.append(f"| {arm} | {_fmt(a['mean'])} | {a['max']:.4f} | {a['std']:.4f} "
                         f"| {_fmt(a.get('near'))} | {_fmt(a.get('far'))} "
                         f"| {_fmt(a['pool_mean_distance'])} "
                         f"| {_fmt(a['turnover_per_100_steps'])} |")
        lines += ["", f"Near/far cut: Eq.-2 distance {r['distance_cut']:.1f} to the nearest "
                      f"pool member. Floor (mean abs difference of the same forgetting read on "
                      f"the second batch): {r['floor']:.4f}.", ""]
    if "underestimation" in results:
        u = results["underestimation"]
        lines += ["## 3. Underestimation: recovery gain (inherited loss - loss after "
                  "15 steps alone)", "",
                  "| variant | mean gain | d4 = 2 | d4 = 5 | floor: mean abs(gain - gain "
                  "on 2nd batch) |", "|---|---|---|---|---|"]
        for v, s in u["summary"].items():
            lines.append(f"| {v} | {_fmt(s['all'])} | {_fmt(s['d4=2'])} | {_fmt(s['d4=5'])} "
                         f"| {s['floor']:.4f} |")
        if u.get("region_offsets"):
            lines += ["", "Per-region offset of +SSE34 (own sub-supernet minus the shared "
                          "copy, same archs):", "", "| region | n | loss | top-1 |",
                      "|---|---|---|---|"]
            for region, o in u["region_offsets"].items():
                lines.append(f"| {region} | {o['n']} | {_fmt(o['loss'])} | {_fmt(o['top1'])} |")
        lines.append("")
    if "pinas" in results:
        lines += ["## 4. Π-NAS: feature and parameter shift of the student", "",
                  "| variant | " + " | ".join(
                      next(iter(results["pinas"].values()))["feature"]["channel_shift"])
                  + " | 1 - cos pooled | consecutive cosine | coherence | path variance |",
                  "|---" * 9 + "|"]
        for v, r in results["pinas"].items():
            f, p = r["feature"], r["parameter"]
            lines.append(f"| {v} | " + " | ".join(_fmt(m) for m in f["channel_shift"].values())
                         + f" | {_fmt(f['one_minus_cosine'])} | {_fmt(p['consecutive_cosine'])}"
                         f" | {p['coherence']:.4f} (random walk {p['random_walk_coherence']:.3f})"
                         f" | {p['path_variance']:.3f} (2nd batch "
                         f"{p['path_variance_floor']:.3f}) |")
        floor = next(iter(results["pinas"].values()))["feature"]
        lines += ["| floor | " + " | ".join(_fmt(m) for m in floor["channel_shift_floor"].values())
                  + f" | {_fmt(floor['one_minus_cosine_floor'])} | | | |", ""]
    if "stability" in results:
        lines += ["## 5. Rank stability: Kendall tau of consecutive rankings", "",
                  "| stage | mean | n |", "|---|---|---|"]
        for s, m in results["stability"]["consecutive_kendall"].items():
            lines.append(f"| {s} | {_fmt(m)} | {m['n']} |")
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------- the bench

DIAGNOSTICS = ("interference", "cpt", "underestimation", "pinas", "stability")


def last_lr(st) -> float:
    return st.phases()[-1].lr


def summarize_gains(gains: dict) -> dict:
    return {"all": mean_ci([g["gain"] for g in gains.values()]),
            "d4=2": mean_ci([g["gain"] for g in gains.values() if g["cell"][1] == 2]),
            "d4=5": mean_ci([g["gain"] for g in gains.values() if g["cell"][1] == 5]),
            "floor": statistics.mean(abs(g["gain"] - g["gain_second"]) for g in gains.values())}


def run(preset: presets.Preset, data, folder: Path, device: str, sizes: dict, chosen, seed: int,
        log) -> tuple[dict, dict]:
    """Every chosen diagnostic on the ablation's checkpoints: (results, seconds: those spent
    training missing checkpoints, and each diagnostic's)."""
    probe = Probe(data, preset, sizes["per_cell"], sizes["probe_images"], seed,
                  sizes["train_batch"], sizes["calib_batches"])
    seconds = {"training": 0.0}

    def variant(name):
        t = time.perf_counter()
        st, _ = ablation.train_variant(name, preset, data, device, folder, log, seed)
        seconds["training"] += time.perf_counter() - t
        return st

    results = {"probe_archs": [supernet.encode(a) for a in probe.archs]}
    for name in chosen:
        if name == "interference":
            states = {v: variant(v) for v in ("PS", "SPOS")}
        elif name == "cpt":
            states = {"APS_v3": variant("APS_v3")}
        elif name == "underestimation":
            states = {v: variant(v) for v in ("PS", "APS_v3", "APS_v3+CPT", "+SSE34",
                                             "+SSE34-shared")}
        elif name == "pinas":
            states = {v: variant(v) for v in ("Pi-NAS-pre", "Pi-NAS-same-path-pre")}
        else:  # stability: the full method's chain again from the warm-up's checkpoint
            variant("warm-up")
            st = trainer.new_state(preset, ablation.VARIANTS["+SSE34+Dis"][0], seed, device)
            trainer.load_checkpoint(st, folder / "checkpoints" / "warm-up.pt", extend=True)
        t = time.perf_counter()
        if name == "interference":
            results[name] = {v: {"cosine": interference(st.net, probe, sizes["pairs"], seed),
                                 "forgetting": two_model_forgetting(st.net, probe, last_lr(st),
                                                                    seed=seed)}
                             for v, st in states.items()}
        elif name == "cpt":
            lr = stages.stage_phases("cpt", preset)[0].lr
            results[name] = forgetting_under_cpt(states["APS_v3"].net, probe, lr,
                                                 sizes["cpt_steps"], sizes["window"], seed)
        elif name == "underestimation":
            lr = stages.stage_phases("cpt", preset)[0].lr
            gains = {v: recovery_gains(st, probe, lr, sizes["recovery_steps"])
                     for v, st in states.items()}
            results[name] = {"gains": gains, "maps": {v: cell_map(g) for v, g in gains.items()},
                             "summary": {v: summarize_gains(g) for v, g in gains.items()},
                             "region_offsets": region_offsets(states["+SSE34"], probe)}
        elif name == "pinas":
            results[name] = {v: {"feature": feature_shift(st.net, probe, seed=seed),
                                 "parameter": parameter_shift(st, probe, sizes["pinas_steps"],
                                                              cross_path=v == "Pi-NAS-pre")}
                             for v, st in states.items()}
        elif name == "stability":
            results[name] = rank_stability(st, data, probe, sizes["stability_probes"], log)
        seconds[name] = time.perf_counter() - t
    return results, seconds


def main(preset: str = typer.Option("tiny", help="tiny or small (the ablation's presets)"),
         name: str = typer.Option(None, help="the ablation's run folder in runs/ "
                                             "(default: ablation-<preset>)"),
         only: str = typer.Option(",".join(DIAGNOSTICS), help="comma-separated diagnostics"),
         seed: int = 0, device: str = "cpu", data_dir: Path = typer.Option(None),
         runs: Path = typer.Option(ROOT / "runs"),
         out: Path = typer.Option(ROOT / "bench" / "results")):
    if preset not in presets.PRESETS:
        raise typer.BadParameter(f"unknown preset {preset!r}; presets are "
                                 f"{', '.join(presets.PRESETS)}")
    chosen = [d.strip() for d in only.split(",") if d.strip()]
    unknown = [d for d in chosen if d not in DIAGNOSTICS]
    if unknown:
        raise typer.BadParameter(f"unknown diagnostic {unknown[0]!r}; they are "
                                 f"{', '.join(DIAGNOSTICS)}")
    p = presets.PRESETS[preset]
    sizes = SIZES.get(preset, SIZES["tiny"])
    presets.set_threads(p)
    data = load_data(p, device, data_dir)
    folder = runs / (name or f"ablation-{p.name}")
    (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
    log = ablation.echo(events.EventLog(folder / "events.jsonl"))
    results, seconds = run(p, data, folder, device, sizes, chosen, seed, log)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"mechanisms-{p.name}"
    earlier = out / f"{stem}.json"
    if earlier.exists() and set(chosen) != set(DIAGNOSTICS):  # --only: keep the others' results
        old = json.loads(earlier.read_text())
        same_probe = old["results"].get("probe_archs") == results["probe_archs"]
        if old.get("sizes") == sizes and same_probe:
            results = {**old["results"], **results}
            # training: what training the missing checkpoints took, over every run
            seconds = {**old["seconds"], **seconds,
                       "training": old["seconds"]["training"] + seconds["training"]}
    pictures = write_pictures(results, out, stem)
    md = markdown(results, p.name, len(results["probe_archs"]),
                  {k: round(v) for k, v in seconds.items()})
    presets.write_json_atomic(out / f"{stem}.json", {
        "date": date.today().isoformat(), "preset": p.name, "device": evaluate.machine_name(device),
        "sizes": sizes, "seconds": seconds, "results": results})
    (out / f"{stem}.md").write_text(md + "\n")
    typer.echo(md)
    typer.echo(f"wrote {out / stem}.json, .md and {len(pictures)} pictures")


if __name__ == "__main__":
    typer.run(main)
