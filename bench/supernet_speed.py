"""Supernet overhead: forward+backward of sampled subnets through the supernet versus the same
archs as extracted static nets, side by side, same batch. Prints a table, writes JSON.

    python bench/supernet_speed.py                       # CPU, Fashion-MNIST-sized nets
    python bench/supernet_speed.py --device cuda --image-size 32 --in-channels 3 --width-mult 1 --batch 256
"""

import json
import platform
import random
import statistics
import sys
import time
from contextlib import nullcontext
from datetime import date
from pathlib import Path

import torch
import typer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import supernet as sn  # noqa: E402


def step_time(fn, x, iters: int, sync) -> float:
    """Median seconds of one forward+backward of fn(x)."""
    times = []
    for _ in range(iters):
        sync()
        t = time.perf_counter()
        fn(x).float().sum().backward()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(device: str = "cpu", archs: int = 8, iters: int = 5, batch: int = 64, image_size: int = 28,
         in_channels: int = 1, width_mult: float = 0.25, divisor: int = 4, seed: int = 0,
         out: Path = Path("bench/results")):
    torch.manual_seed(seed)
    dev = torch.device(device)
    shape = sn.NetShape(image_size, in_channels, 10, width_mult, divisor)
    fmt = torch.channels_last if dev.type == "cuda" else torch.contiguous_format
    net = sn.Supernet(shape).to(dev, memory_format=fmt)
    autocast = torch.autocast("cuda", torch.bfloat16) if dev.type == "cuda" else nullcontext()
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    x = torch.randn(batch, in_channels, image_size, image_size, device=dev).to(memory_format=fmt)
    rng = random.Random(seed)
    rows = []
    for _ in range(archs):
        arch = sn.sample_arch(rng)
        static = sn.extract_subnet(net, arch).to(memory_format=fmt)
        with autocast:
            for fn in (lambda v: net(v, arch), static):  # warm-up: allocator, kernels
                fn(x).float().sum().backward()
            t_super = step_time(lambda v: net(v, arch), x, iters, sync)
            t_static = step_time(static, x, iters, sync)
        rows.append({"arch": sn.encode(arch), "supernet_s": t_super, "static_s": t_static,
                     "ratio": t_super / t_static})
        net.zero_grad(set_to_none=True)
    ratio = statistics.median(r["ratio"] for r in rows)
    ips_super = batch / statistics.median(r["supernet_s"] for r in rows)
    ips_static = batch / statistics.median(r["static_s"] for r in rows)
    typer.echo(f"{'arch':52}  {'supernet ms':>11}  {'static ms':>9}  {'ratio':>5}")
    for r in rows:
        typer.echo(f"{r['arch']}  {r['supernet_s'] * 1e3:11.1f}  {r['static_s'] * 1e3:9.1f}  {r['ratio']:5.2f}")
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"
    typer.echo(f"median ratio {ratio:.3f}   images/s supernet {ips_super:.0f}  static {ips_static:.0f}"
               f"   ({device_name}, {torch.get_num_threads()} threads, batch {batch}, {image_size}px, width x{width_mult})")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"supernet_speed-{dev.type}.json"
    path.write_text(json.dumps({"date": date.today().isoformat(), "device": device_name, "batch": batch,
                                "shape": shape.__dict__, "median_ratio": ratio, "images_per_s_supernet": ips_super,
                                "images_per_s_static": ips_static, "archs": rows}, indent=1))
    typer.echo(f"wrote {path}")


if __name__ == "__main__":
    typer.run(main)
