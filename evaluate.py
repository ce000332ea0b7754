"""Evaluation with inherited weights: exact BN recalibration, then top-1 on held-out images.

A subnet's accuracy with inherited weights means nothing until its BN statistics are its own:
the supernet's running statistics mix every sampled arch. So every evaluation first
recalibrates BN on a fixed, seeded set of training batches ("Improving the Rank Consistency of
One-Shot NAS", Sec. 3.1: 50 x 256), then measures top-1 on the held-out split. The supernet is
never copied: statistics are written into the sliced running buffers, which the next arch's
calibration overwrites again. Where SSE split the supernet, each arch is evaluated with the
sub-supernet that owns it (train_stages.SubSupernets).

Reference ("Sec." above):
- "Improving the Rank Consistency of One-Shot NAS: Collaborative Solution to Multi-Model
  Forgetting and Unfair Gradient Descent", Zhang et al., OPPO Research, 2nd place of the
  CVPR 2022 lightweight-NAS challenge, supernet track (the text: ../shared/seeds/;
  https://arxiv.org/search/?query=Improving+the+Rank+Consistency+of+One-Shot+NAS&searchtype=title)
"""

import platform
from contextlib import contextmanager, nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F

import parallel
import supernet
from presets import Preset, autocast, bn_momentum
from report import rank_metrics


@torch.no_grad()
def calibrate_bn(net: nn.Module, arch: supernet.Arch | None, batches: list[torch.Tensor]) -> None:
    """Set the BN running statistics of `arch` to the exact mean of its per-batch statistics.

    With momentum 1/(i+1) at batch i, BN's running update r <- (1-m) r + m b is the running
    mean of the batch statistics b (mean, and unbiased variance as BN keeps it), so after the
    last batch it is their exact average, not an EMA. Only the arch's slices are written.
    `arch` is None for a static net.
    """
    net.train()
    try:
        with bn_momentum(net) as bns:
            for i, x in enumerate(batches):
                for bn in bns:
                    bn.momentum = 1.0 / (i + 1)
                with autocast(x.device):
                    net(x) if arch is None else net(x, arch)
    finally:
        net.eval()


@torch.no_grad()
def accuracy(net: nn.Module, arch: supernet.Arch | None, batches) -> float:
    """Top-1 on the held-out batches; one host sync at the end."""
    net.eval()
    correct = torch.zeros((), dtype=torch.long, device=batches[0][0].device)
    total = 0
    for x, y in batches:
        with autocast(x.device):
            logits = net(x) if arch is None else net(x, arch)
        correct += (logits.argmax(1) == y).sum()
        total += len(y)
    return correct.item() / total


@torch.no_grad()
def heldout_metrics(net: nn.Module, batches) -> dict[str, float]:
    """A static net's top-1 and mean cross-entropy on the held-out batches, and both again with
    flip averaging (on the mean of the softmax of each image and of its mirror image, the flip
    the training augmentation uses): four readings of one net, so that the ground truth's
    headline metric can be chosen by which one the seeds agree on most."""
    net.eval()
    dev = batches[0][0].device
    correct, correct_flip = (torch.zeros((), dtype=torch.long, device=dev) for _ in range(2))
    ce, ce_flip = (torch.zeros((), dtype=torch.float64, device=dev) for _ in range(2))
    total = 0
    for x, y in batches:
        with autocast(x.device):
            logits, mirrored = net(x).float(), net(x.flip(3)).float()
        correct += (logits.argmax(1) == y).sum()
        ce += F.cross_entropy(logits, y, reduction="sum").double()
        both = (logits.softmax(1) + mirrored.softmax(1)) / 2
        correct_flip += (both.argmax(1) == y).sum()
        ce_flip += F.nll_loss(both.clamp_min(1e-12).log(), y, reduction="sum").double()
        total += len(y)
    return {"acc": correct.item() / total, "ce": ce.item() / total,
            "acc_flip": correct_flip.item() / total, "ce_flip": ce_flip.item() / total}


def evaluate_archs(net: supernet.Supernet, sse, archs: list[supernet.Arch], calib, evals,
                   progress=None) -> dict[str, float]:
    """Accuracy of each arch with inherited weights: {code: top-1}.

    `sse` (train_stages.SubSupernets, or None before any split): each arch is evaluated with the
    sub-supernet that owns it; archs are grouped by owner so each one's weights are loaded
    once. The net, and every SSE copy, holds the same weights and BN statistics afterwards as
    before, also when this raises: an evaluation during training (a rank probe) must leave no
    trace, since eval-mode forwards later read those statistics (SSE's teacher is taken from
    the net).
    """
    groups: dict[int | None, list[supernet.Arch]] = {}
    for a in archs:
        groups.setdefault(sse.owner(a) if sse else None, []).append(a)
    results, done = {}, 0
    for owner, members in groups.items():
        # statistics put back before `holding` stores the copy away again
        with sse.holding(net, owner) if sse else nullcontext(), bn_statistics_kept(net):
            for a in members:
                calibrate_bn(net, a, calib)
                results[supernet.encode(a)] = accuracy(net, a, evals)
                done += 1
                if progress:
                    progress(done, len(archs))
    return {supernet.encode(a): results[supernet.encode(a)] for a in archs}


@contextmanager
def bn_statistics_kept(net: nn.Module):
    """Puts every BN running statistic of `net` back as it was on exit (a copy of the BN
    buffers only, never of the supernet)."""
    kept = [(b, b.clone()) for m in net.modules() if isinstance(m, nn.BatchNorm2d)
            for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, saved in kept:
                b.copy_(saved)


def evaluate_run(st, data, archs: list[supernet.Arch], log) -> dict[str, float]:
    """`evaluate_archs` of a trained state (trainer.TrainState) with the preset's calibration
    and held-out sets, logging progress. Under torchrun, rank r evaluates archs
    i = r (mod world size); every rank returns all."""
    preset = st.preset
    calib = data.calib_batches(preset.calib_batches, preset.calib_batch_size, seed=0)
    evals = data.eval_batches(preset.eval_subset)
    own = evaluate_archs(st.net, st.sse, parallel.mine(archs), calib, evals,
                         lambda d, n: log("evaluate", done=d, total=n))
    accs = parallel.gather_dict(own)
    return {supernet.encode(a): accs[supernet.encode(a)] for a in archs}


# ---------------------------------------------------------------- probes during training

def make_probe(preset: Preset, data, truth: dict[str, float]):
    """A cheap running rank correlation for the training loop: the ground-truth archs with a
    smaller calibration set and eval subset, no bootstrap."""
    archs = [supernet.decode(c) for c in truth]
    calib = data.calib_batches(preset.probe_calib_batches, preset.calib_batch_size, seed=1)
    evals = data.eval_batches(preset.probe_eval_images)

    def probe(st) -> dict | None:
        accs = evaluate_archs(st.net, st.sse, archs, calib, evals)
        metrics = rank_metrics(list(accs.values()), [truth[c] for c in accs], n_boot=0)
        return {**metrics, "points": scatter_points(accs, truth)}
    return probe


def scatter_points(accs: dict[str, float], truth: dict[str, float]) -> list[list[float]]:
    """[supernet top-1, ground truth] per arch: what the UI's scatter plots."""
    return [[accs[c], truth[c]] for c in truth if c in accs]


def make_scorer(preset: Preset, data):
    """`score(net)`: top-1 of a static net after exact BN recalibration, on the probe's
    calibration and held-out sets (the training loop's way to compare two nets)."""
    calib = data.calib_batches(preset.probe_calib_batches, preset.calib_batch_size, seed=1)
    evals = data.eval_batches(preset.probe_eval_images)

    def score(net: nn.Module) -> float:
        calibrate_bn(net, None, calib)
        return accuracy(net, None, evals)
    return score


def machine_name(device) -> str:
    """The GPU's name, or the CPU's model as /proc/cpuinfo gives it: for tables of results."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    try:  # platform.processor() is empty on most Linux machines
        with open("/proc/cpuinfo") as f:
            names = (line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
            return next(names)
    except (OSError, StopIteration):
        return platform.processor() or "cpu"
