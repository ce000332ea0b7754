"""The paper's stages, in the paper's order: its schedule, then each stage's step.

"Improving the Rank Consistency of One-Shot NAS" (2nd place, CVPR 2022 lightweight-NAS
challenge, supernet track) trains one weight-sharing supernet (supernet.py) in this order:

    warmup      the largest net alone (the challenge handed out a pretrained ResNet-48; we make
                our own). It is also the distillation teacher of SSE.
    aps_depth   Adapted Progressive Shrinking of depth, 3 phases (Sec. 2.2, 3.2)
    aps_width   APS of width, 3 phases (Sec. 3.2)
    cpt         Candidate Plasticity Training with NSAS's constraint pool (Sec. 2.4, 3.3)
    sse34/sse4  Sub-supernet Enhancing with distillation (Sec. 2.3, 3.4)

with the baselines spos (uniform single path: Guo et al., "Single Path One-Shot Neural
Architecture Search with Uniform Sampling", ECCV 2020) and ps_depth/ps_width (uniform
progressive shrinking after once-for-all, Cai et al., ICLR 2020). Π-NAS, the other paper
(pinas.py), runs here as the stage `pinas`, unsupervised, with `linear_head` to rank its archs
by top-1 afterwards.

Read this file top to bottom: the schedule table (`SCHEDULE`) and the phases it makes; the
primitive step (`ce_step`); the warm-up; SPOS, PS and APS (`sampled_step`); CPT, its
constraint pool (`ConstraintPool`, Eq. 2) and its step; SSE, its split (`REGIONS`,
`SubSupernets`), its teacher and its step; Π-NAS's and the linear head's glue; and last the
stage table (`STAGES`) that the training loop (trainer.py) walks.

Every phase restarts its learning rate, warms up linearly and decays by cosine to 0
(presets.lr_at). In each step, K subnets are sampled and each does forward + backward on the
same batch; the gradients add up, then the optimizer takes one step.

References ("Sec.", "Eq." below are the first one's):
- "Improving the Rank Consistency of One-Shot NAS: Collaborative Solution to Multi-Model
  Forgetting and Unfair Gradient Descent", Zhang et al., OPPO Research, 2nd place of the
  CVPR 2022 lightweight-NAS challenge, supernet track (the text: ../shared/seeds/;
  https://arxiv.org/search/?query=Improving+the+Rank+Consistency+of+One-Shot+NAS&searchtype=title)
- SPOS: Guo et al., ECCV 2020, https://arxiv.org/abs/1904.00420
- once-for-all (progressive shrinking): Cai et al., ICLR 2020, https://arxiv.org/abs/1908.09791
- NSAS (the constraint pool): Zhang et al., "Overcoming Multi-Model Forgetting in One-Shot NAS
  with Diversity Maximization", CVPR 2020,
  https://www.paperswithcode.com/paper/overcoming-multi-model-forgetting-in-one-shot
- few-shot NAS (splitting a supernet, SSE's idea): Zhao et al., ICML 2021,
  https://arxiv.org/abs/2006.06863
- Π-NAS: see pinas.py
"""

import math
import random
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

import parallel
import pinas
import supernet
from data import mix_seed
from presets import Preset, autocast, bn_momentum

ANY_DEPTH = supernet.DEPTH_RANGES     # ((2, 5), (2, 5), (2, 8), (2, 5)): every depth
ANY_WIDTH = supernet.WIDTH_CODES      # the challenge's codes of stem+S1, S2, S3, S4
MAX_ONLY = tuple((d, d) for d in supernet.MAX_DEPTHS)
WIDEST = ((1,),) * 4
NARROW_3 = ((1, 2, 3),) * 4
NARROW_5 = ((1, 2, 3), (1, 2, 3), (1, 2, 3, 4, 5), (1, 2, 3, 4, 5))

# ================================================================ the schedule

# The paper's schedule (Sec. 3.2-3.4) in its ImageNet epochs and learning rates (fine-tuning
# from the pretrained ResNet-48); a preset multiplies every epoch count by `epoch_scale` and
# every lr by `lr_scale`. One row per phase:
#    (paper epochs, lr, K paths per step, depth range (lo, hi) of stages 1-4, width codes)
SCHEDULE = {
    # APS_v1 of depth, widths at max: the deepest nets first, then a block shallower, then all
    "aps_depth_v1": [(5, 0.001, 4, ((4, 5), (4, 5), (6, 8), (4, 5)), WIDEST),
                     (10, 0.002, 4, ((3, 5), (3, 5), (4, 8), (3, 5)), WIDEST),
                     (15, 0.004, 4, ((2, 5), (2, 5), (2, 8), (2, 5)), WIDEST)],
    # APS_v2: stage 4 fully elastic from phase 2
    "aps_depth_v2": [(5, 0.001, 4, ((4, 5), (4, 5), (6, 8), (4, 5)), WIDEST),
                     (10, 0.002, 4, ((3, 5), (3, 5), (4, 8), (2, 5)), WIDEST),
                     (15, 0.004, 4, ((2, 5), (2, 5), (2, 8), (2, 5)), WIDEST)],
    # APS_v3, the paper's best: stage 4 fully elastic from the start (a shallow stage 4 is
    # otherwise underestimated, Sec. 2.2)
    "aps_depth_v3": [(5, 0.001, 4, ((4, 5), (4, 5), (6, 8), (2, 5)), WIDEST),
                     (10, 0.002, 4, ((3, 5), (3, 5), (4, 8), (2, 5)), WIDEST),
                     (15, 0.004, 4, ((2, 5), (2, 5), (2, 8), (2, 5)), WIDEST)],
    # PS, the uniform baseline (our reading): every stage's lower bound drops alike, by one
    # block, by two, then to 2, with APS_v1's epochs and lrs
    "ps_depth": [(5, 0.001, 4, ((4, 5), (4, 5), (7, 8), (4, 5)), WIDEST),
                 (10, 0.002, 4, ((3, 5), (3, 5), (6, 8), (3, 5)), WIDEST),
                 (15, 0.004, 4, ((2, 5), (2, 5), (2, 8), (2, 5)), WIDEST)],
    # APS of width, depths fully elastic: stages 3 and 4 widen to 5 codes, then stage 4 to 7
    "aps_width": [(5, 0.001, 4, ANY_DEPTH, NARROW_3),
                  (10, 0.002, 4, ANY_DEPTH, NARROW_5),
                  (25, 0.004, 4, ANY_DEPTH, ANY_WIDTH)],
    # PS of width: the paper's width phases are uniform across stages already but for S3, S4;
    # our baseline keeps them (PS and APS differ in depth only)
    "ps_width": [(5, 0.001, 4, ANY_DEPTH, NARROW_3),
                 (10, 0.002, 4, ANY_DEPTH, NARROW_5),
                 (25, 0.004, 4, ANY_DEPTH, ANY_WIDTH)],
    # SPOS, compute-matched to APS depth + width: 1 path a step where they run K = 4, so
    # 4 x (30 + 40) epochs, as many forward/backward passes (our reading of "the same budget")
    "spos": [(280, 0.004, 1, ANY_DEPTH, ANY_WIDTH)],
    # CPT: one sampled path a step, plus the constraint pool's 10
    "cpt": [(30, 0.001, 1, ANY_DEPTH, ANY_WIDTH)],
    # SSE34: one phase per sub-supernet, in the order of REGIONS["sse34"]
    "sse34": [(6, 0.003, 1, ANY_DEPTH, ANY_WIDTH),
              (9, 0.003, 1, ANY_DEPTH, ANY_WIDTH),
              (6, 0.003, 1, ANY_DEPTH, ANY_WIDTH),
              (9, 0.003, 1, ANY_DEPTH, ANY_WIDTH)],
    # SSE4 (d4 = 2; d4 = 5): the paper gives no epochs; our reading gives both SSE34's longer 9
    "sse4": [(9, 0.003, 1, ANY_DEPTH, ANY_WIDTH),
             (9, 0.003, 1, ANY_DEPTH, ANY_WIDTH)],
}
# CONTROL (bench/mechanisms.py only, not a stage of either paper): SSE34's phases, regions and
# steps on one unsplit copy, which separates what splitting gives from what the extra steps give.
SHARED_CONTROLS = {"sse34_shared": "sse34"}
PINAS_EPOCHS = 70       # Π-NAS from scratch: APS depth + width's 30 + 40 paper epochs (its
                        # code: 100; ours matches APS's budget, the paper's comparison)
PINAS_LR = 0.03         # Π-NAS's code: SGD lr 0.03 at batch 192 (24 x 8 GPUs), scaled linearly
PINAS_BATCH = 192
LINEAR_HEAD_LR = 0.03   # raw pooled features (norm ~8, one common mode) diverge above ~0.1


@dataclass(frozen=True)
class Phase:
    """One stretch of training with one sampling space and one learning-rate schedule."""

    stage: str
    name: str
    epochs: float                 # epochs of our training set: the paper's x preset.epoch_scale
    lr: float                     # initial lr: the paper's x preset.lr_scale
    k: int                        # archs sampled per step
    depths: tuple = ANY_DEPTH     # (lo, hi) per stage
    widths: tuple = ANY_WIDTH
    sub: int | None = None        # SSE: the sub-supernet this phase trains
    region: tuple = ()            # SSE: the (stage-3, stage-4 depth) pairs it samples from
    paper_epochs: float = 0.0     # its length in the paper's epochs (the pools' refills count them)

    def space(self) -> dict:
        return {"depths": [list(r) for r in self.depths], "widths": [list(w) for w in self.widths]}


def paper_phases(stage: str, aps: str = "v3") -> list[Phase]:
    """A stage's phases as the paper gives them (SCHEDULE), unscaled. SSE's phases sample from
    their region, and each trains its own sub-supernet; those of `sse34_shared` (SSE34 without
    the split: the budget-matched control) all train the one shared copy."""
    split = SHARED_CONTROLS.get(stage, stage)
    key = f"aps_depth_{aps}" if stage == "aps_depth" else split
    rows = SCHEDULE[key]
    if split in REGIONS:
        return [Phase(stage, f"{stage}/{i}", e, lr, k, d, w,
                      sub=None if stage in SHARED_CONTROLS else i,
                      region=tuple(sorted(REGIONS[split][i])), paper_epochs=e)
                for i, (e, lr, k, d, w) in enumerate(rows)]
    return [Phase(stage, f"{key}/{i + 1}" if len(rows) > 1 else key, e, lr, k, d, w,
                  paper_epochs=e)
            for i, (e, lr, k, d, w) in enumerate(rows)]


def scaled(stage: str, preset: Preset, aps: str) -> list[Phase]:
    return [replace(p, epochs=p.epochs * preset.epoch_scale, lr=p.lr * preset.lr_scale)
            for p in paper_phases(stage, aps)]


def warmup_phases(stage: str, preset: Preset, aps: str) -> list[Phase]:
    return [Phase(stage, stage, preset.warmup_epochs, preset.warmup_lr, 1, MAX_ONLY, WIDEST)]


def pinas_phases(stage: str, preset: Preset, aps: str) -> list[Phase]:
    """From scratch, like the warm-up: its lr is not a fine-tuning lr."""
    lr = PINAS_LR * preset.batch_size / PINAS_BATCH
    return [Phase(stage, stage, PINAS_EPOCHS * preset.epoch_scale, lr, 2)]


def linear_head_phases(stage: str, preset: Preset, aps: str) -> list[Phase]:
    """A linear probe as long as the warm-up: forward passes only."""
    return [Phase(stage, stage, preset.warmup_epochs, LINEAR_HEAD_LR, 1)]


def phase_length(phase: Phase, preset: Preset, train_size: int) -> int:
    """Optimizer steps in a phase."""
    return max(1, round(phase.epochs * train_size / preset.batch_size))


# ================================================================ the primitive step

def ce_step(st, archs, x, y, weight: float = 1.0) -> list[torch.Tensor]:
    """Forward + backward of each arch on the same batch, gradients accumulate."""
    losses = []
    for arch in archs:
        with autocast(x.device):
            loss = F.cross_entropy(st.net(x, arch), y)
        (loss * weight).backward()
        losses.append(loss.detach())
    return losses


def sample_in(st, phase: Phase) -> supernet.Arch:
    """An arch from the phase's space; in SSE, from the phase's region of (d3, d4)."""
    if phase.region:
        d3, d4 = st.rng.choice(phase.region)
        return supernet.sample_arch(st.rng, ANY_DEPTH[:2] + ((d3, d3), (d4, d4)), phase.widths)
    return supernet.sample_arch(st.rng, phase.depths, phase.widths)


# ================================================================ warm-up

def warmup_step(st, phase: Phase, x, y):
    """Full-net warm-up: the largest net alone (our stage; the challenge gave a pretrained one)."""
    return [supernet.MAX_ARCH], ce_step(st, [supernet.MAX_ARCH], x, y)


def keep_warmup_net(st, phase: Phase, last: bool) -> None:
    """The warm-up's full net, kept as SSE's candidate distillation teacher."""
    full = supernet.extract_subnet(st.net, supernet.MAX_ARCH)
    st.warmup_weights = {k: v.clone() for k, v in full.state_dict().items()}


# ================================================================ SPOS, PS and APS

def sampled_step(st, phase: Phase, x, y):
    """SPOS, PS and APS (Sec. 2.1, 2.2, Eq. 1): K archs from the phase's space, summed gradients.

    APS differs from PS in the schedule alone (SCHEDULE): which depths each phase opens."""
    archs = [sample_in(st, phase) for _ in range(phase.k)]
    return archs, ce_step(st, archs, x, y)


# ================================================================ CPT: the constraint pool

# OPPO's pools (their train_supernet_nsas.py and train_supernet_split_separate_multi_stage.py),
# as (members, recent archs remembered, k nearest members a novelty averages over): k is
# every other member. CPT keeps one pool; SSE one per sub-supernet, smaller.
CPT_POOL = (10, 100, 9)
SSE_POOL = (7, 80, 6)
# OPPO refills every pool with random candidates (drawn with replacement) at steps 0 and 500
# of each 626-step epoch of theirs: at 0 and 0.8 of every paper epoch.
POOL_REFILLS = (0.0, 0.8)


class ConstraintPool:
    """NSAS's constraint pool with the paper's Eq.-2 distance: the archs whose accuracy a step
    must not forget (Sec. 2.4, 3.3).

    A small set of archs kept as diverse as possible, whose losses join every step's, so that
    training the sampled arch does not undo what the shared weights learned for the others.
    Novelty of an arch = mean Eq.-2 distance (`supernet.distances`) to its `k` nearest pool
    members. Each step looks at the member nearest to the current sample (the one its update
    would disturb most); if some recent arch is more novel with respect to the rest of the
    pool than that member is, it takes that member's place (NSAS's rule). The stages `refill`
    the pool with random candidates as OPPO's code does (`refills_pool`); a pool that is not
    full (never, in the stages) takes the most novel recent arch instead.

    Where OPPO's code differs, we keep the paper's: its distance leaves out the last stage-4
    code (Eq. 2 counts every code) and divides by 47 (a constant, which changes no
    comparison); its recent list may offer an arch that is already a member, ours only the
    others (a refill, drawn with replacement, can hold one arch twice in both).
    """

    def __init__(self, size: int = CPT_POOL[0], recent: int = CPT_POOL[1], k: int = CPT_POOL[2]):
        self.size = size
        self.k = k
        self.members: list[supernet.Arch] = []
        self.recent: deque[supernet.Arch] = deque(maxlen=recent)

    def refill(self, archs: list[supernet.Arch]) -> None:
        """New members (OPPO's reset); the recent archs stay."""
        self.members = list(archs)

    def novelties(self, archs: list[supernet.Arch], others: list[supernet.Arch]) -> torch.Tensor:
        if not others:
            return torch.full((len(archs),), math.inf)
        d = supernet.distances(archs, others)
        return d.topk(min(self.k, len(others)), dim=1, largest=False).values.mean(1)

    def update(self, sampled: supernet.Arch) -> None:
        self.recent.append(sampled)
        candidates = [a for a in dict.fromkeys(self.recent) if a not in self.members]
        if not candidates:
            return
        if len(self.members) < self.size:
            self.members.append(candidates[int(self.novelties(candidates, self.members).argmax())])
            return
        nearest = int(supernet.distances([sampled], self.members)[0].argmin())  # the first, on ties
        rest = self.members[:nearest] + self.members[nearest + 1:]
        scores = self.novelties(candidates + [self.members[nearest]], rest)
        best = int(scores[:-1].argmax())
        if scores[best] > scores[-1]:
            self.members[nearest] = candidates[best]

    def stats(self) -> dict:
        """Size, mean and min pairwise Eq.-2 distance, mean novelty of the members; their codes,
        and what a reader scans them by: depths, and each stage's mean width in % of its base."""
        n = len(self.members)
        out = {"size": n, "mean_dist": 0.0, "min_dist": 0.0, "novelty": 0.0,
               "archs": [supernet.encode(a) for a in self.members],
               "depths": [list(a.depths) for a in self.members],
               "widths": [supernet.stage_widths(a) for a in self.members]}
        if n > 1:
            d = supernet.distances(self.members, self.members)
            pairs = d[torch.triu_indices(n, n, 1).unbind()]
            others = d + torch.diag(torch.full((n,), math.inf))
            nearest = others.topk(min(self.k, n - 1), 1, largest=False).values
            out.update(mean_dist=pairs.mean().item(), min_dist=pairs.min().item(),
                       novelty=nearest.mean().item())
        return out

    def state_dict(self) -> dict:
        return {"members": [supernet.encode(a) for a in self.members],
                "recent": [supernet.encode(a) for a in self.recent],
                "sizes": [self.size, self.recent.maxlen, self.k]}

    def load_state_dict(self, state: dict) -> None:
        size, recent, self.k = state.get("sizes", CPT_POOL)
        self.size = size
        self.members = [supernet.decode(c) for c in state["members"]]
        self.recent = deque((supernet.decode(c) for c in state["recent"]), maxlen=recent)


def refills_pool(step: int, steps: int, paper_epochs: float) -> bool:
    """Whether a pool is refilled before `step` of a phase of `steps` steps, `paper_epochs`
    long: at the step each of OPPO's refill points (POOL_REFILLS) falls in, scaled like every
    other length. Our reading where a paper epoch is a few steps: points that fall in one step
    refill it once; where a paper epoch is under a step (`tiny`: 0.6), every step refills, so
    the pool is a fresh random draw each step that NSAS's rule then acts on once. A phase of
    unknown length (0 steps or epochs: a step run by hand) refills at its first step only."""
    if steps <= 0 or paper_epochs <= 0:
        return step == 0
    per_epoch = steps / paper_epochs
    first, last = math.floor(step / per_epoch) - 1, math.floor((step + 1) / per_epoch) + 1
    return any(math.floor((e + f) * per_epoch + 1e-9) == step
               for e in range(max(0, first), last + 1) for f in POOL_REFILLS)


def candidates_of(st, phase: Phase) -> list | None:
    """The run's candidate list for this phase (SSE: the part in its region), None without one."""
    if st.candidates is None:
        return None
    key = ("candidates", phase.region)
    if key not in st.derived:
        st.derived[key] = [a for a in st.candidates
                           if not phase.region or (a.depths[2], a.depths[3]) in phase.region]
    return st.derived[key]


def next_path(st, phase: Phase) -> supernet.Arch:
    """CPT's and SSE's sampled path. With a candidate list (`--candidates`; the challenge's
    45,000 at `paper`), OPPO's walk: step i of a phase takes the next arch of shuffled copies of
    the list (SSE: of its region's part), so no candidate is trained twice before all were
    once. Without one, a uniform sample of the phase's space (or region): the challenge's
    candidates are close to uniform over it, so the distribution is the same; the coverage
    and the repeats are not."""
    archs = candidates_of(st, phase)
    if archs is None:
        return sample_in(st, phase)
    n, i = divmod(st.step, len(archs))
    key = ("walk", phase.name)
    if st.derived.get(key, (None,))[0] != n:  # a fresh shuffled copy: a pure function of n
        order = list(archs)
        random.Random(mix_seed(st.seed, st.phase_index, n, 17)).shuffle(order)
        st.derived[key] = (n, order)
    return st.derived[key][1][i]


def refill_pool(st, phase: Phase) -> None:
    """At OPPO's refill points, new members drawn with replacement from the candidate list (SSE:
    its region's part), or uniformly from the phase's space (region) without one."""
    if not refills_pool(st.step, st.phase_steps, phase.paper_epochs):
        return
    archs = candidates_of(st, phase)
    draw = (lambda: st.rng.choice(archs)) if archs is not None else (lambda: sample_in(st, phase))
    st.pool.refill([draw() for _ in range(st.pool.size)])


def cpt_step(st, phase: Phase, x, y):
    """Candidate Plasticity Training (Sec. 2.4, 3.3): 0.5 CE(sampled) + 0.5 mean CE(pool).

    The pool losses backpropagate into the shared weights: that is what regularises the
    update against forgetting the pool's archs (the NSAS demo detaches them; we do not, nor
    does OPPO's code). The pool is OPPO's: refilled with random candidates about every 0.8
    paper epoch, kept diverse by NSAS's rule in between.
    """
    arch = next_path(st, phase)
    refill_pool(st, phase)
    st.pool.update(arch)
    losses = ce_step(st, [arch], x, y, 0.5)
    losses += ce_step(st, st.pool.members, x, y, 0.5 / len(st.pool.members))
    return [arch] + st.pool.members, losses


# ================================================================ SSE: the split

# Sub-supernet Enhancing (Sec. 2.3, 3.4): under weight sharing the archs with a shallow stage 3
# or stage 4 are underestimated, because the deeper archs they share weights with pull those
# weights their own way. SSE splits the trained supernet into sub-supernets, copies of its
# weights, each fine-tuned only on the archs of one region of (stage-3 depth, stage-4 depth),
# with distillation from a strong full net ("Dis"); an arch is then evaluated with the copy that
# owns its region. Regions as (stage-3 depth, stage-4 depth) pairs ("83" = d3 8, d4 3). The copy
# after the last region, the shared one, owns every pair not listed; it is left as it was.
REGIONS = {
    "sse34": [{(2, 2), (2, 3), (2, 4)},            # 0: shallow stage 3 and stage 4
              {(d3, 2) for d3 in range(3, 9)},     # 1: the shallowest stage 4
              {(8, 3), (8, 4), (8, 5)},            # 2: the deepest stage 3
              {(d3, 5) for d3 in range(2, 8)}],    # 3: the deepest stage 4
    "sse4": [{(d3, 2) for d3 in range(2, 9)},      # 0: d4 = 2
             {(d3, 5) for d3 in range(2, 9)}],     # 1: d4 = 5
    "sse34_shared": [],  # CONTROL without a split: the shared copy owns every arch
}


def region_owner(arch: supernet.Arch, stage: str) -> int:
    """The copy that owns `arch` under `stage`'s split: the first region holding its (d3, d4),
    else the shared copy (the last index)."""
    pair = (arch.depths[2], arch.depths[3])
    return next((i for i, r in enumerate(REGIONS[stage]) if pair in r), len(REGIONS[stage]))


class SubSupernets:
    """The sub-supernets of one SSE split: every copy's weights, which one the supernet holds,
    and the distillation teacher's weights.

    The supernet module holds one copy at a time; the others wait here as state dicts. Weights
    are copied into the existing parameters, so optimizer references stay valid and no module
    is ever deep-copied."""

    def __init__(self, stage: str):
        self.stage = stage
        self.regions = REGIONS[stage]
        self.shared = len(self.regions)       # the index of the untouched shared copy
        self.weights: dict[int, dict] = {}    # copy index -> its state dict, while not held
        self.current: int | None = None       # the copy the supernet holds now
        self.teacher_weights: dict | None = None  # a StaticNet of MAX_ARCH; None without "Dis"
        self.teacher: nn.Module | None = None     # that net, built for the phases that use it

    @classmethod
    def split(cls, stage: str, net: nn.Module, teacher_weights) -> "SubSupernets":
        """Every copy, the shared one too, starts from the weights CPT left."""
        subs = cls(stage)
        state = net.state_dict()
        subs.weights = {i: {k: v.clone() for k, v in state.items()}
                        for i in range(len(subs.regions) + 1)}
        subs.current = subs.shared
        subs.teacher_weights = teacher_weights
        return subs

    def owner(self, arch: supernet.Arch) -> int:
        return region_owner(arch, self.stage)

    def hold(self, net: nn.Module, sub: int) -> None:
        """Make `net` hold copy `sub`, storing the copy it held first."""
        if self.current == sub:
            return
        self.weights[self.current] = {k: v.clone() for k, v in net.state_dict().items()}
        net.load_state_dict(self.weights[sub])
        self.current = sub

    @contextmanager
    def holding(self, net: nn.Module, sub: int):
        """`net` holds copy `sub` inside the block and the copy it held before after it, also
        when the block raises."""
        before = self.current
        self.hold(net, sub)
        try:
            yield net
        finally:
            self.hold(net, before)

    def build_teacher(self, shape: supernet.NetShape, device) -> None:
        """`teacher`: the distillation teacher as a network in eval mode (None without "Dis")."""
        self.teacher = None
        if self.teacher_weights is not None:
            net = supernet.StaticNet(supernet.MAX_ARCH, shape).to(device)
            net.load_state_dict(self.teacher_weights)
            self.teacher = net.eval().requires_grad_(False)

    def state_dict(self) -> dict:
        return {"stage": self.stage, "weights": self.weights, "current": self.current,
                "teacher_weights": self.teacher_weights}

    def load_state_dict(self, state: dict) -> None:
        self.weights = state["weights"]
        self.current = state["current"]
        self.teacher_weights = state["teacher_weights"]


def stronger_teacher(net: supernet.Supernet, warmup_weights: dict, score, log) -> dict:
    """SSE's teacher: the warm-up's full net, or the supernet's largest subnet as APS and CPT
    left it, whichever `score` finds more accurate; both top-1s go to the log.

    The paper distils from the pretrained ResNet-48 the challenge handed out (with `--init`,
    so do we: `begin_sse`). Our warm-up stands in for it, and at small budgets it can be weaker
    than the largest subnet after the stages that follow it; a weaker teacher would pull SSE
    down, so we take the stronger one.
    Without `score` the warm-up's net is the teacher. With it, the teacher is the net as it was
    scored, BN statistics included: `score` recalibrates them, and the teacher runs in eval
    mode on them (the warm-up's running statistics, an EMA, are not what was scored).
    """
    if score is None:
        return warmup_weights
    warm = supernet.StaticNet(supernet.MAX_ARCH, net.shape).to(net.fc.weight.device)
    warm.load_state_dict(warmup_weights)
    warm = warm.eval().requires_grad_(False)
    largest = supernet.extract_subnet(net, supernet.MAX_ARCH)
    warm_top1, largest_top1 = parallel.from_main((score(warm), score(largest)))
    chosen = "largest subnet" if largest_top1 > warm_top1 else "warm-up"
    log("kd_teacher", warmup_top1=warm_top1, largest_subnet_top1=largest_top1, chosen=chosen)
    teacher = largest if largest_top1 > warm_top1 else warm
    return {k: v.clone() for k, v in teacher.state_dict().items()}


def begin_sse(st, phase: Phase, log, score) -> None:
    """Split the supernet at the first SSE phase (choosing the distillation teacher then), hold
    this phase's sub-supernet, give it a pool of its own, and build the teacher; again on a
    resume, where the split and the pool are in the checkpoint.

    The teacher is the `--init` net where the run started from one (OPPO's: the challenge's
    pretrained ResNet-48), else the stronger of our warm-up's net and the largest subnet."""
    if st.sse is None or st.sse.stage != phase.stage:
        teacher = None
        if st.kd and st.init:
            teacher = st.warmup_weights
            log("kd_teacher", chosen="the --init net")
        elif st.kd and st.warmup_weights is not None:
            teacher = stronger_teacher(st.net, st.warmup_weights, score, log)
        st.sse = SubSupernets.split(phase.stage, st.net, teacher)
    st.sse.hold(st.net, st.sse.shared if phase.sub is None else phase.sub)
    if st.step == 0:  # OPPO's pool per region: smaller, refilled from the region (sse_step)
        st.pool = ConstraintPool(*SSE_POOL)
    st.sse.build_teacher(st.preset.shape, st.device())
    if st.kd and st.sse.teacher is None:
        log("warning", message=f"{phase.name}: distillation asked for, but no warm-up ran "
                               "before it to be the teacher; training without KD")


def sse_step(st, phase: Phase, x, y):
    """Sub-supernet Enhancing (Sec. 2.3, 3.4): 0.4 CE + 0.2 pool CE + 0.4 KD ("Dis").

    The sampled arch comes from the sub-supernet's own region, and so do its pool's members:
    OPPO's code keeps a pool per region (SSE_POOL), refilled from the region's candidates as
    CPT's is; the pool term is the mean over its 7 members (their 0.2/7 each). KD is Hinton's
    KL(teacher || student) at temperature 1 (OPPO's soft-label cross-entropy differs from it by
    the teacher's entropy, a constant: the same gradients). Without KD the paper gives no
    weights: we drop the KD term and keep the other two's 2 : 1 ratio, 2/3 CE + 1/3 pool CE.
    """
    arch = next_path(st, phase)
    refill_pool(st, phase)
    st.pool.update(arch)
    teacher = st.sse.teacher
    w_ce, w_pool = (0.4, 0.2) if teacher is not None else (2 / 3, 1 / 3)
    with autocast(x.device):
        logits = st.net(x, arch)
        loss = F.cross_entropy(logits, y)
        total = w_ce * loss
        if teacher is not None:
            with torch.no_grad():
                target = F.softmax(teacher(x).float(), 1)
            kd = F.kl_div(F.log_softmax(logits.float(), 1), target, reduction="batchmean")
            total = total + 0.4 * kd
    total.backward()
    losses = [loss.detach()] + ce_step(st, st.pool.members, x, y, w_pool / len(st.pool.members))
    return [arch] + st.pool.members, losses


def end_sse(st, phase: Phase, last: bool) -> None:
    """After the last SSE phase the supernet holds the shared copy again."""
    if last:
        st.sse.hold(st.net, st.sse.shared)


# ================================================================ Π-NAS and its linear head

def pinas_step(st, phase: Phase, x, pixels):
    """Π-NAS's step (pinas.PiNAS.step) on the images and their normalisation (`pixels`: mean
    and std, to augment in pixel space). The labels stop before this: it is not given them."""
    g = torch.Generator().manual_seed(mix_seed(st.seed, st.phase_index, st.step, 5))
    return st.pinas.step(st.net, x, pixels, st.rng, g, phase.depths, phase.widths)


def begin_pinas(st, phase: Phase, log, score) -> None:
    if st.pinas is None:
        cross_path = phase.stage != "pinas_same_path"
        st.pinas = pinas.PiNAS(st.net, st.preset.queue_size, st.seed, cross_path)


def end_pinas(st, phase: Phase, last: bool) -> None:
    """Π-NAS's teacher and queue are of no use to the stages after it."""
    if last:
        st.pinas = None


def update_mean_teacher(st, archs) -> None:
    st.pinas.update_teacher(st.net, archs)


def queue_fields(st) -> dict:
    return {"queue_fill": st.pinas.queue.fill / len(st.pinas.queue.vectors),
            "ema_momentum": pinas.MOMENTUM}


def linear_head_step(st, phase: Phase, x, y):
    """Π-NAS's ranking needs a classifier (its training saw no labels): our reading of its linear
    evaluation trains only the supernet's sliced classifier on frozen features, a random path
    per batch, so every arch can then be ranked by calibrated top-1 like any other run's.
    Frozen includes BN: features use the batch's statistics, and the running statistics stay
    as Π-NAS left them (momentum 0; every evaluation recalibrates them per arch anyway)."""
    arch = sample_in(st, phase)
    with autocast(x.device):
        with torch.no_grad(), bn_momentum(st.net, 0.0):
            f = st.net.features(x, arch)
        logits = supernet.classify(f, st.net.fc.weight[:, :f.shape[1]], st.net.fc.bias)
        loss = F.cross_entropy(logits, y)
    loss.backward()
    return [arch], [loss.detach()]


def supernet_params(st) -> list:
    return list(st.net.parameters())


def classifier_params(st) -> list:
    return list(st.net.fc.parameters())


def pinas_params(st) -> list:
    return [*st.net.parameters(), *st.pinas.projector.parameters()]


# ================================================================ the stage table

@dataclass(frozen=True)
class Stage:
    """What the training loop needs to know of a stage."""

    phases: Callable                # (stage, preset, aps) -> its phases, scaled
    step: Callable                  # (st, phase, x, y) -> (archs run, their losses)
    params: Callable = supernet_params  # (st) -> what its optimizer trains
    weight_decay: float = 3e-5      # the APS/CPT/SSE paper's (and OPPO's code's)
    labels: bool = True             # False: it gets (st, phase, x, (mean, std)), no labels
    uses_pool: bool = False         # keeps CPT's constraint pool (logged as `pool` events)
    probes: bool = True             # a rank probe means something during it
    begin: Callable | None = None   # (st, phase, log, score) before a phase's first step
    end: Callable | None = None     # (st, phase, last) after a phase's last step
    after_step: Callable | None = None  # (st, archs) after each optimizer step
    extras: Callable | None = None  # (st) -> extra fields of a progress event


SSE = dict(uses_pool=True, begin=begin_sse, end=end_sse)
# no classifier is trained: a rank probe there would measure noise
PINAS = dict(params=pinas_params, weight_decay=pinas.WEIGHT_DECAY, labels=False, probes=False,
             begin=begin_pinas, end=end_pinas, after_step=update_mean_teacher, extras=queue_fields)
# The stages a user chains (`--stages`), in the papers' order, the baselines after them.
STAGES = {
    "warmup": Stage(warmup_phases, warmup_step, end=keep_warmup_net),
    "aps_depth": Stage(scaled, sampled_step),
    "aps_width": Stage(scaled, sampled_step),
    "cpt": Stage(scaled, cpt_step, uses_pool=True),
    "sse34": Stage(scaled, sse_step, **SSE),
    "sse4": Stage(scaled, sse_step, **SSE),
    "pinas": Stage(pinas_phases, pinas_step, **PINAS),
    "linear_head": Stage(linear_head_phases, linear_head_step, params=classifier_params),
    "spos": Stage(scaled, sampled_step),
    "ps_depth": Stage(scaled, sampled_step),
    "ps_width": Stage(scaled, sampled_step),
}
# CONTROLS of bench/mechanisms.py, not stages of either paper: SSE34's steps on one unsplit
# copy, and Π-NAS with same-path positives (everything else as in `pinas`).
CONTROLS = {
    "sse34_shared": Stage(scaled, sse_step, **SSE),
    "pinas_same_path": Stage(pinas_phases, pinas_step, **PINAS),
}
RUNNABLE = {**STAGES, **CONTROLS}
SPLITS = ("sse4", "sse34", "sse34_shared")  # the ways SSE splits a supernet: a run takes one
METHODS = {"full": ("warmup", "aps_depth", "aps_width", "cpt", "sse34"),
           "spos": ("warmup", "spos"),
           "ps": ("warmup", "ps_depth", "ps_width"),
           "pinas": ("pinas", "linear_head"),
           # labels only after Π-NAS; the warm-up then makes SSE's distillation teacher
           "pinas_full": ("pinas", "warmup", "aps_depth", "aps_width", "cpt", "sse34")}
APS_VERSIONS = ("v1", "v2", "v3")


def stage_phases(stage: str, preset: Preset, aps: str = "v3") -> list[Phase]:
    """The phases of one stage: the paper's K and sampling spaces, its epochs and lrs scaled by
    the preset (the warm-up, Π-NAS and its linear head: the preset's own)."""
    if stage not in RUNNABLE:
        raise ValueError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
    return RUNNABLE[stage].phases(stage, preset, aps)


def check_stages(stages) -> tuple[str, ...]:
    """The stage list as a tuple; ValueError naming what cannot run."""
    stages = tuple(stages)
    unknown = [s for s in stages if s not in RUNNABLE]
    if unknown or not stages:
        raise ValueError(f"unknown stage {unknown[0] if unknown else ''!r}; "
                         f"stages are {', '.join(STAGES)}")
    if len(set(SPLITS) & set(stages)) > 1:
        raise ValueError("sse4 and sse34 are two ways to split one supernet: a run takes one "
                         "of them")
    return stages


def check_candidates(stages, candidates) -> None:
    """ValueError where a candidate list leaves a region of the run's SSE split empty (its
    sub-supernet would have nothing to train on)."""
    if candidates is None:
        return
    for stage in [s for s in stages if s in SPLITS]:
        for i, region in enumerate(REGIONS[SHARED_CONTROLS.get(stage, stage)]):
            if not any((a.depths[2], a.depths[3]) in region for a in candidates):
                pairs = " ".join(f"{d3}{d4}" for d3, d4 in sorted(region))
                raise ValueError(f"the candidate list has no arch in region {i} of {stage} "
                                 f"(stage-3, stage-4 depths {pairs})")
