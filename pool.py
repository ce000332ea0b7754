"""CPT's constraint pool: the archs whose accuracy a step must not forget.

Candidate Plasticity Training ("Improving the Rank Consistency of One-Shot NAS", Sec. 2.4 and
3.3) borrows the constraint pool of NSAS ("Overcoming Multi-Model Forgetting in One-Shot NAS
with Diversity Maximization", Zhang et al., CVPR 2020): a small set of archs kept as diverse as
possible, whose losses join every step's, so that training the sampled arch does not undo what
the shared weights learned for the others. Diversity is measured with the paper's Eq. 2, the
summed difference of width codes (`supernet.distances`).

References ("Sec.", "Eq." above are the first one's):
- "Improving the Rank Consistency of One-Shot NAS: Collaborative Solution to Multi-Model
  Forgetting and Unfair Gradient Descent", Zhang et al., OPPO Research, 2nd place of the
  CVPR 2022 lightweight-NAS challenge, supernet track (the text: ../shared/seeds/;
  https://arxiv.org/search/?query=Improving+the+Rank+Consistency+of+One-Shot+NAS&searchtype=title)
- NSAS: https://www.paperswithcode.com/paper/overcoming-multi-model-forgetting-in-one-shot
"""

import math
from collections import deque

import torch

import supernet


class ConstraintPool:
    """NSAS's constraint pool with the paper's Eq.-2 distance.

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
        """Size, mean and min pairwise Eq.-2 distance, mean novelty of the members, their codes."""
        n = len(self.members)
        out = {"size": n, "mean_dist": 0.0, "min_dist": 0.0, "novelty": 0.0,
               "archs": [supernet.encode(a) for a in self.members]}
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
                "recent": [supernet.encode(a) for a in self.recent]}

    def load_state_dict(self, state: dict) -> None:
        self.members = [supernet.decode(c) for c in state["members"]]
        self.recent.clear()
        self.recent.extend(supernet.decode(c) for c in state["recent"])
