"""Sub-supernet Enhancing: one supernet split into copies, each owning a region of depths.

"Improving the Rank Consistency of One-Shot NAS", Sec. 2.3 and 3.4: under weight sharing the
archs with a shallow stage 3 or stage 4 are underestimated, because the deeper archs they share
weights with pull those weights their own way. SSE splits the trained supernet into
sub-supernets, copies of its weights, each fine-tuned only on the archs of one region of
(stage-3 depth, stage-4 depth), with distillation from a strong full net ("Dis"); an arch is
then evaluated with the copy that owns its region. The SSE loss itself is `stages.sse_step`.
SSE is few-shot NAS's idea (Zhao et al., "Few-shot Neural Architecture Search", ICML 2021,
https://arxiv.org/abs/2006.06863) of splitting one supernet into several, split here by depth.

Reference ("Sec." above):
- "Improving the Rank Consistency of One-Shot NAS: Collaborative Solution to Multi-Model
  Forgetting and Unfair Gradient Descent", Zhang et al., OPPO Research, 2nd place of the
  CVPR 2022 lightweight-NAS challenge, supernet track (the text: ../shared/seeds/;
  https://arxiv.org/search/?query=Improving+the+Rank+Consistency+of+One-Shot+NAS&searchtype=title)
"""

from contextlib import contextmanager

import torch.nn as nn

import parallel
import supernet

# Regions as (stage-3 depth, stage-4 depth) pairs (Sec. 2.3, 3.4; "83" = d3 8, d4 3). The copy
# after the last region, the shared one, owns every pair not listed; it is left as it was.
REGIONS = {
    "sse34": [{(2, 2), (2, 3), (2, 4)},            # 0: shallow stage 3 and stage 4
              {(d3, 2) for d3 in range(3, 9)},     # 1: the shallowest stage 4
              {(8, 3), (8, 4), (8, 5)},            # 2: the deepest stage 3
              {(d3, 5) for d3 in range(2, 8)}],    # 3: the deepest stage 4
    "sse4": [{(d3, 2) for d3 in range(2, 9)},      # 0: d4 = 2
             {(d3, 5) for d3 in range(2, 9)}],     # 1: d4 = 5
    "sse34_shared": [],  # the control without a split: the shared copy owns every arch
}


def region_owner(arch: supernet.Arch, stage: str) -> int:
    """The copy that owns `arch` under `stage`'s split: the first region holding its (d3, d4),
    else the shared copy (the last index)."""
    pair = (arch.depths[2], arch.depths[3])
    return next((i for i, r in enumerate(REGIONS[stage]) if pair in r), len(REGIONS[stage]))


class SubSupernets:
    """The sub-supernets of one SSE split: every copy's weights, which one the supernet holds,
    the CPT pool's members at the split, and the distillation teacher's weights.

    The supernet module holds one copy at a time; the others wait here as state dicts. Weights
    are copied into the existing parameters, so optimizer references stay valid and no module
    is ever deep-copied."""

    def __init__(self, stage: str):
        self.stage = stage
        self.regions = REGIONS[stage]
        self.shared = len(self.regions)       # the index of the untouched shared copy
        self.weights: dict[int, dict] = {}    # copy index -> its state dict, while not held
        self.current: int | None = None       # the copy the supernet holds now
        self.cpt_members: list[str] = []      # codes of CPT's pool when the supernet was split
        self.teacher_weights: dict | None = None  # a StaticNet of MAX_ARCH; None without "Dis"
        self.teacher: nn.Module | None = None     # that net, built for the phases that use it

    @classmethod
    def split(cls, stage: str, net: nn.Module, pool_members, teacher_weights) -> "SubSupernets":
        """Every copy, the shared one too, starts from the weights CPT left; the pool is kept
        for each copy to start its own from."""
        subs = cls(stage)
        state = net.state_dict()
        subs.weights = {i: {k: v.clone() for k, v in state.items()}
                        for i in range(len(subs.regions) + 1)}
        subs.current = subs.shared
        subs.cpt_members = [supernet.encode(a) for a in pool_members]
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
                "cpt_members": self.cpt_members, "teacher_weights": self.teacher_weights}

    def load_state_dict(self, state: dict) -> None:
        self.weights = state["weights"]
        self.current = state["current"]
        self.cpt_members = state["cpt_members"]
        self.teacher_weights = state["teacher_weights"]


def stronger_teacher(net: supernet.Supernet, warmup_weights: dict, score, log) -> dict:
    """SSE's teacher: the warm-up's full net, or the supernet's largest subnet as APS and CPT
    left it, whichever `score` finds more accurate; both top-1s go to the log.

    The paper distils from the pretrained ResNet-48 the challenge handed out. Our warm-up
    stands in for it, and at small budgets it can be weaker than the largest subnet after the
    stages that follow it; a weaker teacher would pull SSE down, so we take the stronger one.
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
