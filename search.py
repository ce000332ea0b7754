"""Search under a budget, and export the chosen subnet: what a trained supernet is for.

The search is the evolutionary one of SPOS and OFA: a population of archs inside the budget,
of which the better half breeds the next generation by mutation and crossover. An arch's
fitness is its top-1 with the supernet's weights after exact BN recalibration, through
`evaluate.evaluate_archs`, so SSE runs evaluate it with the sub-supernet that owns it.

Budgets are in the challenge's units: FLOPs and parameters of the code's full-width net at
224 px with 1000 classes, as `nas.py arch CODE` prints them, so that a budget means the same
thing at every preset. Latency is measured on this machine, on the static net of the run's
preset. Every evaluation is appended to `search.jsonl` in the run folder: an interrupted
search resumes, and a search with another budget reuses every earlier evaluation.

The export is the chosen arch as a static network with the supernet's weights (its SSE
sub-supernet's, where it has one) and BN statistics recalibrated exactly: `net.pt` for
`supernet.StaticNet`, and `net.pt2`, a `torch.export` program that normalizes [0, 1] images
itself and runs with plain torch, without this repository.
"""

import json
import math
import random
import re
import statistics
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn

import evaluate
import supernet
from presets import Preset, replace_atomically, write_json_atomic

CHALLENGE_SHAPE = supernet.NetShape()  # 224 px, 3 channels, 1000 classes, full width
UNITS = {"": 1.0, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
# the smallest arch of the space: every stage at its least depth and narrowest codes
SMALLEST = supernet.Arch(tuple(lo for lo, _ in supernet.DEPTH_RANGES),
                         tuple(c[-1] for c in supernet.WIDTH_CODES),
                         tuple((c[-1],) * lo for (lo, _), c in
                               zip(supernet.DEPTH_RANGES, supernet.WIDTH_CODES)))


# ---------------------------------------------------------------- budgets

@dataclass(frozen=True)
class Budget:
    flops: float | None = None       # challenge units
    params: float | None = None      # challenge units
    latency_ms: float | None = None  # on this machine, batch 1, the preset's static net

    def describe(self) -> str:
        parts = [f"FLOPs <= {self.flops / 1e9:.3g} G" if self.flops else "",
                 f"params <= {self.params / 1e6:.3g} M" if self.params else "",
                 f"latency <= {self.latency_ms:g} ms" if self.latency_ms else ""]
        return ", ".join(p for p in parts if p) or "no budget"


def parse_amount(text: str, what: str) -> float:
    """'2.5G', '800M', '8e6' as a number; ValueError with one line for anything else."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([KMGT]?)\s*", text or "", re.I)
    if not match:
        raise ValueError(f"{what} {text!r} is not a number with an optional K, M, G or T")
    value = float(match.group(1)) * UNITS[match.group(2).upper()]
    if not value > 0:
        raise ValueError(f"{what} must be positive, got {text!r}")
    return value


def challenge_size(arch: supernet.Arch) -> tuple[int, int]:
    """(FLOPs, params) in the challenge's units."""
    return supernet.size_of(arch, CHALLENGE_SHAPE)


def check_budget(budget: Budget) -> None:
    """ValueError when no arch of the space can meet the budget."""
    flops, params = challenge_size(SMALLEST)
    if budget.flops is not None and budget.flops < flops:
        raise ValueError(f"--flops {budget.flops:.4g} is below the smallest arch's "
                         f"{flops / 1e9:.3f} G")
    if budget.params is not None and budget.params < params:
        raise ValueError(f"--params {budget.params:.4g} is below the smallest arch's "
                         f"{params / 1e6:.3f} M")


@torch.no_grad()
def measure_latency(arch: supernet.Arch, shape: supernet.NetShape, device) -> float:
    """Median milliseconds of one forward pass of the static net on one image."""
    net = supernet.StaticNet(arch, shape).to(device).eval()
    x = torch.randn(1, shape.in_channels, shape.image_size, shape.image_size, device=device)
    times = []
    for i in range(13):
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        net(x)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        if i >= 3:  # the first calls allocate and pick algorithms
            times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times)


# ---------------------------------------------------------------- the evaluation log

class SearchLog:
    """`search.jsonl`: one line per evaluated arch, the weights it was evaluated with, its
    top-1 and sizes, and one line per latency measurement. Read once, appended to after."""

    def __init__(self, path: Path, weights: str, device: str):
        self.path = path
        self.weights = weights
        self.device = device
        self.top1: dict[str, float] = {}
        self.latency: dict[str, float] = {}
        for line in path.read_text().splitlines() if path.exists() else []:
            try:
                e = json.loads(line)
            except ValueError:
                continue  # a line cut short by a kill: that arch is evaluated again
            if e.get("weights") == weights and "top1" in e:
                self.top1[e["arch"]] = e["top1"]
            if e.get("device") == device and "latency_ms" in e:
                self.latency[e["arch"]] = e["latency_ms"]

    def append(self, record: dict) -> None:
        cut = self.path.exists() and self.path.stat().st_size and not self._ends_with_newline()
        with self.path.open("a") as f:
            f.write(("\n" if cut else "") + json.dumps(record) + "\n")  # after a cut line

    def _ends_with_newline(self) -> bool:
        with self.path.open("rb") as f:
            f.seek(-1, 2)
            return f.read(1) == b"\n"


class Fitness:
    """Top-1 of archs with the run's supernet (a trainer.TrainState), cached in the search log;
    sizes and latency."""

    def __init__(self, st, data, log: SearchLog):
        preset = st.preset
        self.st = st
        self.preset = preset
        self.data = data
        self.log = log
        self.calib = data.calib_batches(preset.calib_batches, preset.calib_batch_size, seed=0)
        self.evals = data.eval_batches(preset.eval_subset)
        self.evaluated = 0  # evaluations this process made (not read from the log)
        # the net each scored code builds: at narrow widths several codes build one net
        self.scored_nets = {supernet.physical_net(supernet.decode(c), preset.shape): c
                            for c in log.top1}

    def latency(self, arch: supernet.Arch) -> float:
        code = supernet.encode(arch)
        if code not in self.log.latency:
            ms = measure_latency(arch, self.preset.shape, self.data.device)
            self.log.latency[code] = ms
            self.log.append({"arch": code, "device": self.log.device, "latency_ms": ms})
        return self.log.latency[code]

    def admits(self, arch: supernet.Arch, budget: Budget) -> bool:
        flops, params = challenge_size(arch)
        if budget.flops is not None and flops > budget.flops:
            return False
        if budget.params is not None and params > budget.params:
            return False
        return budget.latency_ms is None or self.latency(arch) <= budget.latency_ms

    def __call__(self, archs: list[supernet.Arch]) -> dict[str, float]:
        """{code: top-1} of `archs`, evaluating only the nets the log does not hold. A code that
        builds the same net as a scored one (`supernet.physical_net`: narrow presets round
        width codes together) takes its score, which evaluating it would repeat exactly."""
        todo, twins, pending = [], {}, {}
        for a in dict.fromkeys(archs):
            if supernet.encode(a) in self.log.top1:
                continue
            net = supernet.physical_net(a, self.preset.shape)
            twin = self.scored_nets.get(net) or pending.get(net)
            if twin:
                twins[a] = twin
            else:
                pending[net] = supernet.encode(a)
                todo.append(a)
        if todo:
            accs = evaluate.evaluate_archs(self.st.net, self.st.sse, todo, self.calib, self.evals)
            for a in todo:
                self._record(a, accs[supernet.encode(a)])
            self.evaluated += len(todo)
        for a, twin in twins.items():
            self._record(a, self.log.top1[twin], same_net_as=twin)
        return {supernet.encode(a): self.log.top1[supernet.encode(a)] for a in archs}

    def _record(self, arch: supernet.Arch, top1: float, **extra) -> None:
        code = supernet.encode(arch)
        flops, params = challenge_size(arch)
        preset_flops = supernet.size_of(arch, self.preset.shape)[0]
        self.log.top1[code] = top1
        self.scored_nets.setdefault(supernet.physical_net(arch, self.preset.shape), code)
        self.log.append({"arch": code, "weights": self.log.weights, "top1": top1,
                         "flops": flops, "params": params, "preset_flops": preset_flops,
                         **extra})


# ---------------------------------------------------------------- evolution

def mutate(arch: supernet.Arch, rng: random.Random, p: float = 0.1) -> supernet.Arch:
    """Each stage's depth, output width and every conv1 width is redrawn with probability p;
    a deeper stage gets new blocks of random width. The result is always a valid arch."""
    depths, outs, mids = [], [], []
    for s, ((lo, hi), codes) in enumerate(zip(supernet.DEPTH_RANGES, supernet.WIDTH_CODES)):
        depth = rng.randint(lo, hi) if rng.random() < p else arch.depths[s]
        stage = list(arch.mids[s][:depth])
        stage += [rng.choice(codes) for _ in range(depth - len(stage))]
        depths.append(depth)
        outs.append(rng.choice(codes) if rng.random() < p else arch.outs[s])
        mids.append(tuple(rng.choice(codes) if rng.random() < p else c for c in stage))
    return supernet.Arch(tuple(depths), tuple(outs), tuple(mids))


def crossover(a: supernet.Arch, b: supernet.Arch, rng: random.Random) -> supernet.Arch:
    """Each stage whole (depth, output width, conv1 widths) from one parent or the other."""
    picks = [a if rng.random() < 0.5 else b for _ in range(4)]
    return supernet.Arch(tuple(p.depths[s] for s, p in enumerate(picks)),
                         tuple(p.outs[s] for s, p in enumerate(picks)),
                         tuple(p.mids[s] for s, p in enumerate(picks)))


def sample_within(rng: random.Random, n: int, admits) -> list[supernet.Arch]:
    """Up to n distinct uniform archs that `admits` accepts (at most 200 n draws)."""
    found: dict[supernet.Arch, None] = {}
    for _ in range(200 * n):
        if len(found) == n:
            break
        arch = supernet.sample_arch(rng)
        if arch not in found and admits(arch):
            found[arch] = None
    return list(found)


def evolve(fitness, admits, population: int, generations: int, seed: int,
           log=lambda event, **f: None) -> dict[str, float]:
    """The evolutionary search; {code: top-1} of every arch it evaluated.

    `fitness(archs)` gives {code: top-1}; `admits(arch)` says whether an arch meets the budget.
    Generation 0 is uniform inside the budget; each next one keeps the better half and fills
    the rest with children, half by mutation and half by crossover, all inside the budget.
    """
    rng = random.Random(seed)
    pop = sample_within(rng, population, admits)
    if not pop:
        raise ValueError("no arch of 200 x population uniform samples meets the budget")
    scores = dict(fitness(pop))
    for generation in range(generations + 1):
        if generation:
            parents = sorted(pop, key=lambda a: -scores[supernet.encode(a)])
            parents = parents[:max(2, population // 2)]
            pop = parents + breed(parents, population - len(parents), admits, rng)
            scores.update(fitness(pop))
        best = max(scores, key=scores.get)
        log("search", done=generation, total=generations, best=best, top1=scores[best],
            evaluated=len(scores))
    return scores


def breed(parents, n: int, admits, rng: random.Random) -> list[supernet.Arch]:
    """n distinct children of `parents` inside the budget (fewer when 100 n tries find none)."""
    children: dict[supernet.Arch, None] = {}
    for _ in range(100 * n):
        if len(children) == n:
            break
        if rng.random() < 0.5 or len(parents) < 2:
            child = mutate(rng.choice(parents), rng)
        else:
            child = crossover(*rng.sample(parents, 2), rng)
        if child not in children and child not in parents and admits(child):
            children[child] = None
    return list(children)


def pareto_front(points: list[dict]) -> list[dict]:
    """The points no other point beats on both FLOPs (fewer) and top-1 (higher), by FLOPs."""
    front, best = [], -math.inf
    for p in sorted(points, key=lambda p: (p["flops"], -p["top1"])):
        if p["top1"] > best:
            front.append(p)
            best = p["top1"]
    return front


def evaluated_points(log: SearchLog) -> list[dict]:
    """Every arch the log holds with its top-1 and challenge FLOPs and parameters."""
    points = []
    for code, top1 in log.top1.items():
        flops, params = challenge_size(supernet.decode(code))
        points.append({"arch": code, "top1": top1, "flops": flops, "params": params})
    return points


def search_summary(log: SearchLog, budget: Budget, fitness: Fitness) -> dict:
    """The best arch under the budget among every arch the log holds, and the Pareto front."""
    points = evaluated_points(log)
    inside = [p for p in points if fitness.admits(supernet.decode(p["arch"]), budget)]
    best = max(inside, key=lambda p: p["top1"]) if inside else None
    if best is not None:
        arch = supernet.decode(best["arch"])
        best["preset_flops"] = supernet.size_of(arch, fitness.preset.shape)[0]
    return {"budget": budget.describe(), "budget_values": vars(budget), "best": best,
            "pareto_front": pareto_front(points), "evaluated": len(points)}


def write_search_png(path: Path, summary: dict, points: list[dict]) -> Path:
    """Every evaluated arch as a dot (top-1 against challenge FLOPs), the front, the budget."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([p["flops"] / 1e9 for p in points], [p["top1"] for p in points], s=8,
               color="tab:gray", label="evaluated")
    front = summary["pareto_front"]
    ax.plot([p["flops"] / 1e9 for p in front], [p["top1"] for p in front], "o-", ms=4,
            label="Pareto front")
    if summary["budget_values"]["flops"]:
        ax.axvline(summary["budget_values"]["flops"] / 1e9, ls="--", color="tab:red",
                   label="FLOPs budget")
    if summary["best"]:
        best = summary["best"]
        ax.scatter([best["flops"] / 1e9], [best["top1"]], s=60, marker="*", color="tab:red",
                   label="best under the budget", zorder=3)
    ax.set(xlabel="GFLOPs (challenge units: full width, 224 px)",
           ylabel="supernet top-1 (BN recalibrated)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def weights_key(st, device) -> str:
    """Which weights a top-1 in search.jsonl was measured with, and where: another device or
    precision gives other top-1s."""
    return f"phase {st.phase_index} step {st.step}, {torch.device(device).type}"


def run_search(st, data, run_dir: Path, budget: Budget,
               population: int, generations: int, seed: int, log) -> dict:
    """Search, then write `search.json` and `search.png` in the run folder; their summary."""
    check_budget(budget)
    search_log = SearchLog(run_dir / "search.jsonl", weights_key(st, data.device),
                           evaluate.machine_name(data.device))
    fitness = Fitness(st, data, search_log)

    def log_with_front(event: str, **fields):  # the UI draws the front as it grows
        front = pareto_front(evaluated_points(search_log))
        return log(event, **fields, front=[[p["flops"] / 1e9, p["top1"]] for p in front])

    started = time.perf_counter()
    evolve(fitness, lambda a: fitness.admits(a, budget), population, generations, seed,
           log_with_front)
    seconds = time.perf_counter() - started
    summary = search_summary(search_log, budget, fitness)
    summary["evaluated_now"] = fitness.evaluated
    summary["archs_per_min"] = 60 * fitness.evaluated / seconds if fitness.evaluated else None
    write_json_atomic(run_dir / "search.json", summary)
    write_search_png(run_dir / "search.png", summary, evaluated_points(search_log))
    return summary


# `nas.py all` ends with a short search under the default budget: 16 uniform archs, then 4
# generations of 8 children
ALL_POPULATION = 16
ALL_GENERATIONS = 4


def default_budget() -> Budget:
    """Half the FLOPs of the largest arch: the budget `nas.py all` searches under."""
    return Budget(flops=challenge_size(supernet.decode(supernet.MAX_CODE))[0] / 2)


def best_distinct(scores: dict[str, float], top: int, shape: supernet.NetShape,
                  admits=lambda arch: True) -> list[supernet.Arch]:
    """The `top` archs of highest score that `admits` accepts, one per net: codes that build
    the same net at `shape` (`supernet.physical_net`) count once, the best-scored of them."""
    best: dict[tuple, supernet.Arch] = {}
    for code in sorted(scores, key=lambda c: (-scores[c], c)):
        arch = supernet.decode(code)
        if admits(arch):
            best.setdefault(supernet.physical_net(arch, shape), arch)
        if len(best) == top:
            break
    return list(best.values())


# ---------------------------------------------------------------- export

class Normalized(nn.Module):
    """The static net behind the dataset's normalization: takes [0, 1] images."""

    def __init__(self, net: nn.Module, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.net = net
        self.register_buffer("mean", mean.reshape(1, -1, 1, 1).float().clone())
        self.register_buffer("std", std.reshape(1, -1, 1, 1).float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def inherited_subnet(st, arch: supernet.Arch, calib) -> nn.Module:
    """`arch` as a static net with its owner's weights (in a trainer.TrainState's supernet) and
    exactly recalibrated BN; the supernet holds the same weights afterwards as before."""
    with st.sse.holding(st.net, st.sse.owner(arch)) if st.sse else nullcontext():
        net = supernet.extract_subnet(st.net, arch)
    evaluate.calibrate_bn(net, None, calib)
    return net.eval()


def save_export(out: Path, net: supernet.StaticNet, preset: Preset,
                mean: torch.Tensor, std: torch.Tensor) -> tuple[Path, Path]:
    """`out` (code, preset and state_dict for StaticNet) and `out` with suffix .pt2 (the
    torch.export program on [0, 1] images, batch size free)."""
    net = net.cpu().eval()
    replace_atomically(out, lambda tmp: torch.save(
        {"code": supernet.encode(net.arch), "preset": asdict(preset),
         "state_dict": net.state_dict()}, tmp))
    wrapped = Normalized(net, mean.cpu(), std.cpu()).eval()
    size = preset.image_size
    example = torch.rand(2, preset.in_channels, size, size)
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(wrapped, (example,), dynamic_shapes=({0: batch},))
    program_path = out.with_suffix(".pt2")
    replace_atomically(program_path, lambda tmp: _save_program(program, tmp))
    return out, program_path


def _save_program(program, path: Path) -> None:
    with open(path, "wb") as f:  # a file object: torch.export wants a .pt2 name otherwise
        torch.export.save(program, f)


def load_export(path: Path) -> supernet.StaticNet:
    """The StaticNet of a `net.pt`."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    preset = Preset(**blob["preset"])
    net = supernet.StaticNet(supernet.decode(blob["code"]), preset.shape)
    net.load_state_dict(blob["state_dict"])
    return net.eval()
