"""Speed of one preset's net on one device, supernet side by side with static nets:

1. training step: K uniformly sampled archs, forward+backward of each through the supernet on one
   batch and one SGD step, versus the same archs as static nets, each with its own SGD step;
2. evaluation: archs per minute through evaluate.evaluate_archs, BN recalibration included;
3. peak GPU memory of one training step of the largest arch, supernet versus static net;
4. with --all-preset, the wall time of `nas.py all` on that preset.

Images are random uint8 tensors kept on the device: speed does not depend on their content.
Prints a table, writes bench/results/speed-<cpu|cuda>.json.

    python bench/speed.py --preset cifar
    python bench/speed.py --device cpu --preset tiny --iters 3 --sets 2 --eval-archs 5
        --calib-images 256 --eval-images 1000
"""

import gc
import json
import math
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F
import typer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import evaluate  # noqa: E402
import supernet  # noqa: E402
import presets  # noqa: E402
import train_stages as stages  # noqa: E402
import trainer  # noqa: E402
from data import EVAL_BATCH, TensorData  # noqa: E402

LR = 0.01  # small enough that random labels keep the losses finite; the value does not change speed


def on_device(net: torch.nn.Module, dev: torch.device) -> torch.nn.Module:
    """As training holds nets: channels_last on cuda (trainer.new_state does the same for the
    supernet)."""
    return net.to(dev, memory_format=(torch.channels_last if dev.type == "cuda"
                                      else torch.contiguous_format))


def timed(sync, fn, *args) -> float:
    sync()
    t = time.perf_counter()
    fn(*args)
    sync()
    return time.perf_counter() - t


def supernet_step(st: trainer.TrainState, archs, x, y) -> None:
    """What trainer.run_phase does per step of SPOS/PS/APS, less the batch loading and
    logging."""
    st.optimizer.zero_grad(set_to_none=True)
    stages.ce_step(st, archs, x, y)
    st.optimizer.step()


def static_steps(nets, optimizers, x, y) -> None:
    for net, opt in zip(nets, optimizers):
        opt.zero_grad(set_to_none=True)
        with presets.autocast(x.device):
            loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()


def training_step_times(st: trainer.TrainState, x, y, k: int, iters: int, sets: int,
                        sync) -> list[dict]:
    """Per arch set: median seconds of the supernet's K-path step and of the K static steps."""
    rows = []
    for _ in range(sets):
        archs = [supernet.sample_arch(st.rng) for _ in range(k)]
        nets = [on_device(supernet.extract_subnet(st.net, a), x.device) for a in archs]
        opts = [trainer.make_optimizer(n.parameters(), LR) for n in nets]
        supernet_step(st, archs, x, y)  # warm-up: allocator, kernel choice, momentum buffers
        static_steps(nets, opts, x, y)
        t_super, t_static = [], []
        # interleaved, so drift in clocks or machine load hits both sides alike
        for _ in range(iters):
            t_super.append(timed(sync, supernet_step, st, archs, x, y))
            t_static.append(timed(sync, static_steps, nets, opts, x, y))
        s, t = statistics.median(t_super), statistics.median(t_static)
        rows.append({"archs": [supernet.encode(a) for a in archs], "supernet_s": s, "static_s": t,
                     "ratio": s / t})
    return rows


def eval_throughput(st: trainer.TrainState, data: TensorData, n_archs: int, calib_images: int,
                    sync) -> dict:
    bs = st.preset.calib_batch_size
    calib = data.calib_batches(math.ceil(calib_images / bs), bs, seed=0)
    evals = data.eval_batches(0, EVAL_BATCH)
    archs = [supernet.sample_arch(st.rng) for _ in range(n_archs)]
    evaluate.evaluate_archs(st.net, None, archs[:1], calib, evals)  # warm-up
    seconds = timed(sync, evaluate.evaluate_archs, st.net, None, archs, calib, evals)
    return {"archs": n_archs, "seconds": seconds, "archs_per_min": 60 * n_archs / seconds}


def max_arch_supernet_step(preset: presets.Preset, x, y) -> None:
    st = trainer.new_state(preset, ("spos",), 0, x.device)
    st.optimizer = trainer.make_optimizer(st.net.parameters(), LR)
    supernet_step(st, [supernet.MAX_ARCH], x, y)


def max_arch_static_step(preset: presets.Preset, x, y) -> None:
    net = on_device(supernet.StaticNet(supernet.MAX_ARCH, preset.shape), x.device)
    static_steps([net], [trainer.make_optimizer(net.parameters(), LR)], x, y)


def peak_memory_mib(step, preset: presets.Preset, x, y) -> float:
    """Peak of building the model and one training step, above what this bench already holds
    (its own supernet and data), so the two sides are counted from the same floor."""
    gc.collect()
    torch.cuda.empty_cache()
    floor = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step(preset, x, y)
    return (torch.cuda.max_memory_allocated() - floor) / 2**20


def time_all(preset_name: str, device: str, data_dir: Path | None) -> dict:
    run = f"bench-speed-{time.strftime('%Y%m%d-%H%M%S')}"
    cmd = [sys.executable, "nas.py", "all", "--preset", preset_name, "--name", run, "--no-tui",
           "--device", device]
    if data_dir is not None:
        cmd += ["--data-dir", str(data_dir.resolve())]
    t = time.perf_counter()
    rc = subprocess.run(cmd, cwd=ROOT).returncode
    return {"command": " ".join(["python", *cmd[1:]]), "run": run,
            "seconds": time.perf_counter() - t, "rc": rc}


def main(device: str = typer.Option("cuda" if torch.cuda.is_available() else "cpu",
                                    help="cpu or cuda"),
         preset: str = typer.Option("cifar",
                                    help="net shape and batch size from presets.PRESETS: "
                                         "tiny, cifar, fashion, paper"),
         batch: int = typer.Option(0, help="training batch (0: the preset's)"),
         k: int = typer.Option(4, help="archs per supernet training step"),
         iters: int = typer.Option(10, help="timed steps per arch set"),
         sets: int = typer.Option(5, help="arch sets"),
         eval_archs: int = typer.Option(20, help="archs evaluated"),
         calib_images: int = typer.Option(2000, help="BN calibration images per arch"),
         eval_images: int = typer.Option(10000, help="held-out images per arch"),
         all_preset: str = typer.Option(None, help="also time `nas.py all --preset NAME` "
                                                   "(a new run folder)"),
         data_dir: Path = typer.Option(None, help="--data-dir for that `nas.py all`"),
         out: Path = typer.Option(None, help="the JSON to write (default: "
                                             "bench/results/speed-<cpu|cuda>.json)"),
         seed: int = 0):
    """Training, evaluation and memory cost of the supernet versus static nets of the same archs."""
    for name in (preset, all_preset):
        if name is not None and name not in presets.PRESETS:
            raise typer.BadParameter(f"unknown preset {name!r}; presets are "
                                     f"{', '.join(presets.PRESETS)}")
    if device not in ("cpu", "cuda") or (device == "cuda" and not torch.cuda.is_available()):
        raise typer.BadParameter(f"device {device!r} is not available here; use cpu or cuda")
    p, dev = presets.PRESETS[preset], torch.device(device)
    batch = batch or p.batch_size
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    c, s = p.in_channels, p.image_size
    data = TensorData(torch.randint(0, 256, (calib_images, c, s, s), dtype=torch.uint8),
                         torch.randint(0, p.num_classes, (calib_images,)),
                         torch.randint(0, 256, (eval_images, c, s, s), dtype=torch.uint8),
                         torch.randint(0, p.num_classes, (eval_images,)), dev, pad=4)
    x = data.normalize(torch.randint(0, 256, (batch, c, s, s), dtype=torch.uint8, device=dev))
    y = torch.randint(0, p.num_classes, (batch,), device=dev)
    st = trainer.new_state(p, ("spos",), seed, dev)
    st.optimizer = trainer.make_optimizer(st.net.parameters(), LR)

    rows = training_step_times(st, x, y, k, iters, sets, sync)
    evaluation = eval_throughput(st, data, eval_archs, calib_images, sync)
    memory = None
    if dev.type == "cuda":
        memory = {"supernet_mib": peak_memory_mib(max_arch_supernet_step, p, x, y),
                  "static_mib": peak_memory_mib(max_arch_static_step, p, x, y)}

    t_super = statistics.median(r["supernet_s"] for r in rows)
    t_static = statistics.median(r["static_s"] for r in rows)
    ratio = statistics.median(r["ratio"] for r in rows)
    name, threads = evaluate.machine_name(dev), torch.get_num_threads()
    precision = presets.precision_name(dev) + (", channels_last" if presets.channels_last(dev)
                                               else "")
    typer.echo(f"{name}, {threads} threads, {precision}; preset {preset}: {s} px x{c}, "
               f"width x{p.width_mult}, batch {batch}, K {k}, median of {iters} steps per set")
    typer.echo(f"{'set':>3}  {'supernet ms':>11}  {'static ms':>9}  {'ratio':>5}")
    for i, r in enumerate(rows, 1):
        typer.echo(f"{i:3}  {r['supernet_s'] * 1e3:11.1f}  {r['static_s'] * 1e3:9.1f}  "
                   f"{r['ratio']:5.3f}")
    typer.echo(f"{'':26}{'supernet':>10}  {'static':>10}  {'ratio':>6}")
    typer.echo(f"{'train step, ms (median)':26}{t_super * 1e3:10.1f}  {t_static * 1e3:10.1f}  "
               f"{ratio:6.3f}  (median of set ratios; target <= 1.10 on GPU)")
    typer.echo(f"{'train images/s (K paths)':26}{k * batch / t_super:10.0f}  "
               f"{k * batch / t_static:10.0f}")
    if memory:
        typer.echo(f"{'peak MiB, max arch step':26}{memory['supernet_mib']:10.0f}  "
                   f"{memory['static_mib']:10.0f}"
                   f"  {memory['supernet_mib'] / memory['static_mib']:6.3f}")
    else:
        typer.echo(f"{'peak MiB, max arch step':26}{'n/a on CPU':>10}")
    typer.echo(f"{'eval archs/min':26}{evaluation['archs_per_min']:10.1f}  ({eval_archs} archs in "
               f"{evaluation['seconds']:.1f} s; {calib_images} calibration + {eval_images} "
               f"held-out images each)")

    result = {"date": date.today().isoformat(), "device": name, "threads": threads,
              "precision": precision,
              "settings": {"preset": preset, "shape": p.shape.__dict__, "batch": batch, "k": k,
                           "iters": iters, "sets": sets, "eval_archs": eval_archs,
                           "calib_images": calib_images,
                           "calib_batch_size": p.calib_batch_size, "eval_images": eval_images,
                           "eval_batch_size": EVAL_BATCH, "seed": seed},
              "train": {"supernet_s": t_super, "static_s": t_static, "median_ratio": ratio,
                        "images_per_s_supernet": k * batch / t_super,
                        "images_per_s_static": k * batch / t_static,
                        "sets": rows},
              "eval": evaluation, "peak_memory": memory}
    if all_preset:
        del st, data, x, y
        if dev.type == "cuda":
            torch.cuda.empty_cache()  # hand our cached blocks to the subprocess
        result["all"] = time_all(all_preset, device, data_dir)
        typer.echo(f"{result['all']['command']}: {result['all']['seconds']:.0f} s, "
                   f"exit code {result['all']['rc']}")
    path = out or ROOT / "bench" / "results" / f"speed-{dev.type}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    typer.echo(f"wrote {path}")


if __name__ == "__main__":
    typer.run(main)
