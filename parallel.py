"""More than one process: torch.distributed under torchrun, and nothing at all without it.

torchrun starts the processes (one per GPU, or several sharing a GPU or the CPU cores) and
puts RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous address in each one's environment;
`start` joins them into one process group: NCCL with a GPU of their own, gloo on CPU or when
processes share a GPU. Every other function here is the identity in a single process, so a
run without torchrun never touches torch.distributed and stays bit for bit what it was.

What the ranks split:
- Supernet training, by data. Every rank samples the same archs (the same seed drives the same
  RNG through the same decisions), takes its contiguous slice of the single process's global
  batch, and the gradients of all K paths are averaged once per step (`average_gradients`).
  BN normalizes with each rank's own slice: the one way 2 ranks differ from 1.
- Ground truth and evaluation, by arch: rank r takes archs i = r (mod world size) (`mine`);
  the results meet on every rank (`gather_dict`).
Rank 0 alone writes events, checkpoints and results.
"""

import hashlib
import os
from datetime import timedelta

import torch
import torch.distributed as dist


def launched() -> bool:
    """Whether a launcher (torchrun) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    """This process's rank: torchrun's RANK until the group is joined, 0 without torchrun."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if launched() else 1


def start(device: str) -> str:
    """Join torchrun's process group; the device this rank trains on.

    With a GPU, rank LOCAL_RANK takes card LOCAL_RANK modulo the cards there are, so
    `--nproc_per_node=4` on one card puts four processes on it. NCCL refuses two ranks on one
    card, so processes that share one talk through gloo (they only exchange small things).
    """
    if not launched() or dist.is_initialized():
        return device
    backend = "gloo"
    if device == "cuda":
        cards = torch.cuda.device_count()
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % cards}"
        torch.cuda.set_device(device)
        backend = "nccl" if local_world_size() <= cards else "gloo"
    dist.init_process_group(backend, timeout=timedelta(minutes=30))
    return device


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def threads_per_rank(threads: int) -> int:
    """A preset's CPU threads shared among the processes of this machine (at least 1 each)."""
    return max(1, threads // local_world_size())


def part() -> tuple[int, int]:
    """(rank, world size): which share of every global batch is this process's."""
    return rank(), world_size()


def mine(items: list) -> list:
    """This rank's items of a list split by index: i = rank (mod world size)."""
    return items[rank()::world_size()]


def average_gradients(params) -> None:
    """Every rank's gradients replaced by their mean over the ranks, in one all-reduce.

    Called once per step, after all K paths: a sum of per-path gradients on each rank, then
    one exchange. A parameter no path used has no gradient on any rank (all ranks ran the same
    archs), so the same ones are left out everywhere. Why not DistributedDataParallel: it
    exchanges at every backward, K times a step, needs find_unused_parameters for the slices a
    path leaves unused, and its no_sync() across paths would leave parameters that only the
    earlier paths used unsynchronised."""
    if world_size() == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size()
    for g, mean in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(mean.view_as(g))


def average_buffers(*modules) -> None:
    """BN's running statistics averaged over the ranks (each rank saw its own slices), so the
    nets are identical before a checkpoint or a copy is taken."""
    if world_size() == 1:
        return
    for module in modules:
        for buf in module.buffers():
            if buf.is_floating_point():
                dist.all_reduce(buf)
                buf /= world_size()


def mean_over_ranks(x: torch.Tensor) -> torch.Tensor:
    if world_size() == 1:
        return x
    x = x.float().clone()
    dist.all_reduce(x)
    return x / world_size()


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every rank's rows, in rank order: the global batch's rows, as one process has them."""
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def gather_dict(d: dict) -> dict:
    """The union of every rank's dict (the ranks' keys are disjoint)."""
    if world_size() == 1:
        return d
    parts = [None] * world_size()
    dist.all_gather_object(parts, d)
    return {k: v for p in parts for k, v in p.items()}


def from_main(obj):
    """Rank 0's value of `obj` on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _small(values: list[int]) -> torch.Tensor:
    """A tensor for an exchange of a few numbers: NCCL takes only GPU tensors."""
    on_gpu = dist.get_backend() == "nccl"
    return torch.tensor(values, device=torch.cuda.current_device() if on_gpu else "cpu")


def any_rank(flag: bool) -> bool:
    if world_size() == 1:
        return flag
    t = _small([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def differing_ranks(text: str) -> list[int]:
    """The ranks whose `text` differs from rank 0's (a hash of it travels, not the text)."""
    if world_size() == 1:
        return []
    digest = int.from_bytes(hashlib.sha1(text.encode()).digest()[:7], "little")
    own = _small([digest])
    parts = [torch.zeros_like(own) for _ in range(world_size())]
    dist.all_gather(parts, own)
    return [r for r, p in enumerate(parts) if p.item() != parts[0].item()]
