"""Rank-consistent one-shot NAS: the command line, the presets, the run folder and `all`.

    python nas.py all [--preset tiny|cifar|paper] [--tui]   the whole pipeline
    python nas.py train | groundtruth | evaluate | report    its steps, on a run folder
    python nas.py tui --run NAME                             watch a run
    python nas.py arch CODE / sample --n N                   the search space

A run lives in runs/NAME/: config.json, events.jsonl (the contract with the UI),
checkpoints/, groundtruth.json, results.json, report.md.
"""

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import torch
import typer

import evaluate as ev
import supernet as sn
import train_stages as ts

PRESETS = {
    # CPU smoke run on a Fashion-MNIST subset: every stage runs, a paper epoch is about one step.
    "tiny": ts.Preset("tiny", "fashion-mnist", 28, 1, 10, width_mult=0.125, divisor=2, batch_size=64,
                      epoch_scale=0.008, lr_scale=10, warmup_epochs=1, warmup_lr=0.1, train_subset=5000,
                      eval_subset=1000, calib_batches=4, calib_batch_size=128, gt_epochs=1.5, gt_lr=0.1,
                      gt_n=8, gt_twice=4, probe_every=0, probe_calib_batches=2, probe_eval_images=500,
                      log_every=5, checkpoint_every=50, queue_size=1024),
    # One GPU, about an hour: CIFAR-10 at half width, a paper epoch is a quarter of CIFAR.
    "cifar": ts.Preset("cifar", "cifar10", 32, 3, 10, width_mult=0.5, divisor=4, batch_size=256,
                       epoch_scale=0.25, lr_scale=10, warmup_epochs=15, warmup_lr=0.2, eval_subset=10000,
                       calib_batches=8, calib_batch_size=250, gt_epochs=8, gt_lr=0.2, gt_n=50, gt_twice=10,
                       probe_every=200, probe_calib_batches=4, probe_eval_images=2000, queue_size=4096),
    # The cifar budget on Fashion-MNIST (60,000 images), for GPU machines that cannot download CIFAR:
    # carry the four .gz files and pass --data-dir.
    "fashion": ts.Preset("fashion", "fashion-mnist", 28, 1, 10, width_mult=0.5, divisor=4, batch_size=256,
                         epoch_scale=0.25, lr_scale=10, warmup_epochs=15, warmup_lr=0.2, eval_subset=10000,
                         calib_batches=8, calib_batch_size=250, gt_epochs=8, gt_lr=0.2, gt_n=50, gt_twice=10,
                         probe_every=200, probe_calib_batches=4, probe_eval_images=2000, queue_size=4096),
    # The paper's schedule on ImageNet (the warm-up and ground truth recipe are ours).
    "paper": ts.Preset("paper", "imagenet", 224, 3, 1000, width_mult=1.0, divisor=8, batch_size=256,
                       epoch_scale=1.0, lr_scale=1.0, warmup_epochs=90, warmup_lr=0.1, eval_subset=50000,
                       gt_epochs=90, gt_lr=0.1, gt_n=50, gt_twice=10, probe_every=2000, probe_eval_images=5000,
                       checkpoint_every=2000),
}

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Rank-consistent one-shot NAS on the CVPR 2022 ResNet-48 search space.")

IMAGE_SHAPES = {224: sn.NetShape(224, 3, 1000), 32: sn.NetShape(32, 3, 10), 28: sn.NetShape(28, 1, 10)}


def die(message: str, code: int = 2):
    """Bad input: one line on stderr and a non-zero exit, never a traceback."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def get_preset(name: str) -> ts.Preset:
    if name not in PRESETS:
        die(f"unknown preset {name!r}; presets are {', '.join(PRESETS)}")
    return PRESETS[name]


def parse_stages(stages: str | None, method: str) -> tuple[str, ...]:
    if stages:
        chosen = tuple(s.strip() for s in stages.split(",") if s.strip())
        bad = [s for s in chosen if s not in ts.STAGES]
        if bad or not chosen:
            die(f"unknown stage {bad[0] if bad else stages!r}; stages are {', '.join(ts.STAGES)}")
        return chosen
    if method not in ts.METHODS:
        die(f"unknown method {method!r}; methods are {', '.join(ts.METHODS)}")
    return ts.METHODS[method]


def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") or (device == "cuda" and not torch.cuda.is_available()):
        die(f"device {device!r} is not available here; use cpu, cuda or auto")
    return device


def open_run(name: str, config: dict, resume: bool, runs: Path) -> Path:
    """The run folder: new (refusing to reuse one) or, with resume, the same config's."""
    if not name or "/" in name or name.startswith("."):
        die(f"bad run name {name!r}: use letters, digits, '-' and '_'")
    run_dir = runs / name
    saved = run_dir / "config.json"
    if resume:
        if not saved.exists():
            die(f"nothing to resume: {saved} does not exist")
        try:
            old = json.loads(saved.read_text())
        except ValueError:
            die(f"{saved} is not valid JSON; start a new --run")
        if old != config:
            die(f"run {name!r} was started with a different config ({', '.join(ts.config_diff(old, config))}); "
                "resume with the same options or start a new --run")
        return run_dir
    if saved.exists():
        die(f"run {name!r} already exists in {run_dir}: pass --resume to continue it, or choose another --run")
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    ev.write_json_atomic(saved, config)
    return run_dir


def load_run_config(name: str, runs: Path) -> tuple[Path, dict, ts.Preset]:
    run_dir = runs / name
    try:
        config = json.loads((run_dir / "config.json").read_text())
        preset = ts.Preset(**config["preset"])
    except FileNotFoundError:
        die(f"no run {name!r}: {run_dir / 'config.json'} does not exist")
    except (ValueError, KeyError, TypeError):
        die(f"{run_dir / 'config.json'} is not a run config")
    return run_dir, config, preset


def load_data(preset: ts.Preset, device: str, data_dir: Path | None):
    if data_dir is not None and not data_dir.is_dir() and preset.dataset not in ("cifar10", "cifar100"):
        die(f"--data-dir {data_dir} is not a folder")
    try:
        return ts.load_data(preset, device, data_dir)
    except ts.DataError as e:
        die(str(e))


class Console:
    """The event log, echoed to the terminal: a rich progress bar per phase, a line per phase."""

    def __init__(self, log: ts.EventLog, quiet: bool):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
        self.log, self.quiet = log, quiet
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[info]}"), TimeRemainingColumn(), transient=True)
        self.task = None

    def __call__(self, event: str, **f) -> dict:
        record = self.log(event, **f)
        if self.quiet:
            return record
        if event == "phase_start":
            self._new_task(f["phase"], f["steps"], f.get("resumed_at", 0))
        elif event == "progress" and self.task is not None:
            self.bar.update(self.task, completed=f["step"], info=f"loss {f['loss']:.3f}  {f['ips']:.0f} img/s")
        elif event == "groundtruth":
            if f["done"] == 1 or self.task is None:
                self._new_task("ground truth", f["total"], 0)
            self.bar.update(self.task, completed=f["done"], info=f"last {f['acc']:.4f}")
        elif event == "phase_end":
            self._stop()
            typer.echo(f"{f['phase']:<18} loss {f['loss'] if f['loss'] is not None else float('nan'):.4f}"
                       f"  {f['seconds']:.1f} s")
        elif event == "rank":
            typer.echo(f"{'':18} rank  pearson {f['pearson']:.3f}  kendall {f['kendall']:.3f}"
                       f"  spearman {f['spearman']:.3f}  (n = {f['n']})")
        elif event == "warning":
            typer.echo(f"warning: {f['message']}", err=True)
        return record

    def _new_task(self, name: str, total: int, done: int):
        self._stop()
        self.bar.start()
        self.task = self.bar.add_task(name, total=total, completed=done, info="")

    def _stop(self):
        if self.task is not None:
            self.bar.stop()
            self.bar.remove_task(self.task)
            self.task = None


def parse_arch(code: str) -> sn.Arch:
    try:
        return sn.decode(code)
    except ValueError as e:
        die(f"bad arch code {code!r}: {e}")


@app.command()
def arch(code: str = typer.Argument(..., help="52-character arch code (or 51 without the leading '1')"),
         image_size: int = typer.Option(224, help="input size: 224 (ImageNet), 32 (CIFAR) or 28 (Fashion-MNIST)"),
         as_json: bool = typer.Option(False, "--json", help="print one JSON object")):
    """Decode an arch code: depths, channels of every layer, FLOPs and parameters."""
    a = parse_arch(code)
    if image_size not in IMAGE_SHAPES:
        die(f"--image-size must be one of {sorted(IMAGE_SHAPES)}, got {image_size}")
    shape = IMAGE_SHAPES[image_size]
    flops, params = sn.count_flops_params(a, image_size, shape)
    stem, plan = sn.arch_channels(a, shape)
    blocks, i = [], 0
    for s in range(4):
        for b in range(a.depths[s]):
            cin, mid, cout, stride = plan[i]
            blocks.append({"stage": s + 1, "block": b + 1, "in": cin, "mid": mid, "out": cout, "stride": stride})
            i += 1
    if as_json:
        typer.echo(json.dumps({"code": sn.encode(a), "depths": list(a.depths), "stem": stem, "blocks": blocks,
                               "flops": flops, "params": params, "image_size": image_size}))
        return
    typer.echo(f"code    {sn.encode(a)}")
    typer.echo(f"depths  {' '.join(map(str, a.depths))}   stem {stem} channels")
    for blk in blocks:
        typer.echo(f"  stage {blk['stage']} block {blk['block']}: {blk['in']:>4} -> {blk['mid']:>4} -> {blk['out']:>4}"
                   f"  stride {blk['stride']}")
    typer.echo(f"FLOPs   {flops / 1e9:.3f} G at {image_size} px   params {params / 1e6:.3f} M")


@app.command()
def sample(n: int = typer.Option(10, "--n", min=1, help="how many codes"),
           seed: int = typer.Option(0, help="random seed")):
    """Print N arch codes sampled uniformly from the full search space."""
    rng = random.Random(seed)
    for _ in range(n):
        typer.echo(sn.encode(sn.sample_arch(rng)))


# ---------------------------------------------------------------- the pipeline's steps

def train_run(run_dir: Path, config: dict, data, device: str, log, probe=None) -> ts.TrainState:
    """Train from the run's checkpoint if it has one, else from scratch; exits cleanly on Ctrl-C."""
    st = ts.state_from_config(config, device)
    ckpt = run_dir / "checkpoints" / "last.pt"
    try:
        if ckpt.exists():
            ts.load_checkpoint(st, ckpt)
        return ts.train(st, data, run_dir, log, probe)
    except ts.Stopped as e:
        log("end", status="interrupted", message=f"{e}; continue with --resume")
        typer.echo(f"{e}: checkpoint {ckpt}; continue with --resume", err=True)
        raise typer.Exit(130)
    except ts.TrainingError as e:
        log("end", status="failed", message=str(e))
        die(str(e), 1)


def ground_truth_step(run_dir: Path, preset: ts.Preset, data, log, n: int, twice: int, seed: int):
    try:
        gt = ev.GroundTruth(run_dir / "groundtruth.json")
    except ValueError as e:
        die(str(e))
    archs = ev.pick_archs(n, seed, preset)
    truth, ceiling = ev.ground_truth(gt, archs, archs[::max(1, n // twice)][:twice] if twice else [], preset, data, log)
    if ceiling:
        log("noise_ceiling", **{k: ceiling[k] for k in ("pearson", "kendall", "spearman", "n")})
    return truth, ceiling


def size_floors(truth: dict, preset: ts.Preset) -> dict:
    """Rank metrics of FLOPs and of parameter count against the ground truth: rankings that cost
    no training, which a supernet must beat to be worth its own."""
    y = list(truth.values())
    sizes = [sn.count_flops_params(sn.decode(c), preset.image_size, preset.shape) for c in truth]
    return {"flops": ev.rank_metrics([f for f, _ in sizes], y), "params": ev.rank_metrics([p for _, p in sizes], y)}


def run_results(truth: dict, accs: dict, ceiling: dict | None, preset: ts.Preset) -> dict:
    """Rank metrics of the supernet and of the FLOPs/params floors against the ground truth."""
    return {"metrics": ev.rank_metrics([accs[c] for c in truth], list(truth.values())), "noise_ceiling": ceiling,
            **size_floors(truth, preset),
            "archs": [{"arch": c, "supernet": accs[c], "truth": truth[c]} for c in truth]}


def evaluate_step(st: ts.TrainState, preset: ts.Preset, data, archs: list[sn.Arch], log) -> dict[str, float]:
    calib = data.calib_batches(preset.calib_batches, preset.calib_batch_size, seed=0)
    evals = data.eval_batches(preset.eval_subset, 500)
    return ev.evaluate_archs(st, archs, calib, evals, lambda d, n: log("evaluate", done=d, total=n))


def print_summary(results: dict, report: Path) -> None:
    m, c = results["metrics"], results.get("noise_ceiling")
    typer.echo(f"\n{'':10} {'supernet (n=' + str(m['n']) + ')':>26} {'noise ceiling':>26} {'FLOPs':>8}")
    for name in ev.METRICS:
        typer.echo(f"{name:10} {ev.format_metric(m, name):>26} {ev.format_metric(c, name) if c else 'n/a':>26}"
                   f" {results['flops'][name]:>8.3f}")
    typer.echo(f"report: {report}")


# ---------------------------------------------------------------- commands

RUNS = Path("runs")
PresetOpt = typer.Option("cifar", help="tiny (CPU, offline), cifar (one GPU), fashion (cifar's budget on "
                                       "Fashion-MNIST) or paper (ImageNet)")
StagesOpt = typer.Option(None, help=f"comma-separated stages to run instead of the method's: {', '.join(ts.STAGES)}")
MethodOpt = typer.Option("full", help=f"stage list: {', '.join(ts.METHODS)}")
ApsOpt = typer.Option("v3", help="APS version: v1, v2 or v3 (the paper's best)")
KdOpt = typer.Option(True, help="SSE with distillation from the warm-up's full net (\"Dis\")")
DeviceOpt = typer.Option("auto", help="auto, cpu or cuda")
DataDirOpt = typer.Option(None, help="dataset folder (CIFAR download target, ImageNet train/ val/)")


def _setup(preset_name, stages, method, aps, kd, seed, device, data_dir):
    preset = get_preset(preset_name)
    if aps not in ts.APS_DEPTH:
        die(f"unknown APS version {aps!r}; use v1, v2 or v3")
    chosen = parse_stages(stages, method)
    device = pick_device(device)
    return preset, chosen, device, load_data(preset, device, data_dir), ts.run_config(preset, chosen, seed, aps, kd)


@app.command()
def train(preset: str = PresetOpt, run: str = typer.Option(..., help="run name: runs/NAME"),
          stages: str = StagesOpt, method: str = MethodOpt, aps: str = ApsOpt, kd: bool = KdOpt,
          seed: int = 0, resume: bool = typer.Option(False, help="continue the run from its checkpoint"),
          device: str = DeviceOpt, data_dir: Path = DataDirOpt, quiet: bool = False):
    """Train the supernet through the chosen stages, writing runs/NAME."""
    p, chosen, device, data, config = _setup(preset, stages, method, aps, kd, seed, device, data_dir)
    run_dir = open_run(run, config, resume, RUNS)
    log = Console(ts.EventLog(run_dir / "events.jsonl"), quiet)
    log("run_start", run=run, preset=p.name, stages=list(chosen), seed=seed, resumed=resume)
    train_run(run_dir, config, data, device, log)
    log("end", status="done", message="training finished")


@app.command()
def groundtruth(preset: str = PresetOpt, run: str = typer.Option(..., help="run name: runs/NAME"),
                n: int = typer.Option(None, "--n", min=3, help="archs to train (default: the preset's)"),
                seeds: int = typer.Option(2, min=1, max=2, help="2: train a subset twice for the noise ceiling"),
                seed: int = 0, device: str = DeviceOpt, data_dir: Path = DataDirOpt, quiet: bool = False):
    """Train N archs stand-alone (cached in runs/NAME/groundtruth.json); report the noise ceiling."""
    p = get_preset(preset)
    data = load_data(p, pick_device(device), data_dir)
    run_dir = RUNS / run
    run_dir.mkdir(parents=True, exist_ok=True)
    log = Console(ts.EventLog(run_dir / "events.jsonl"), quiet)
    n = n or p.gt_n
    truth, ceiling = ground_truth_step(run_dir, p, data, log, n, min(p.gt_twice, n) if seeds == 2 else 0, seed)
    typer.echo(f"{len(truth)} archs in {run_dir / 'groundtruth.json'}; accuracy "
               f"{min(truth.values()):.4f} .. {max(truth.values()):.4f}")
    if ceiling:
        typer.echo("noise ceiling (seed vs seed): " + "  ".join(f"{k} {ev.format_metric(ceiling, k)}" for k in ev.METRICS)
                   + f"  (n = {ceiling['n']})")


def _trained_state(run_dir: Path, config: dict, device: str) -> ts.TrainState:
    st = ts.state_from_config(config, device)
    ckpt = run_dir / "checkpoints" / "last.pt"
    if not ckpt.exists():
        die(f"run {run_dir.name!r} has no checkpoint yet ({ckpt}); train it first")
    try:
        ts.load_checkpoint(st, ckpt)
    except ts.TrainingError as e:
        die(str(e))
    if st.phase_index < len(st.phases()):
        typer.echo(f"warning: training of {run_dir.name!r} is not finished; evaluating the weights as they are",
                   err=True)
    return st


def _truth_of(run_dir: Path, preset: ts.Preset):
    try:
        gt = ev.GroundTruth(run_dir / "groundtruth.json")
    except ValueError as e:
        die(str(e))
    return gt.accs(preset.dataset, ev.recipe(preset), 0), ev.noise_ceiling(gt, preset)


@app.command()
def evaluate(run: str = typer.Option(..., help="run name: runs/NAME"),
             archs: Path = typer.Option(None, help="challenge-format JSON of archs to evaluate"),
             out: Path = typer.Option(None, help="write the archs file back with acc filled in"),
             device: str = DeviceOpt, data_dir: Path = DataDirOpt, quiet: bool = False):
    """Evaluate archs with the trained supernet (BN recalibrated per arch); write results.json."""
    codes = None
    if archs is not None:
        try:
            codes = ev.read_challenge(archs)
        except ValueError as e:
            die(str(e))
    elif out is not None:
        die("--out needs --archs: the challenge file to fill in")
    run_dir, config, preset = load_run_config(run, RUNS)
    truth, ceiling = _truth_of(run_dir, preset)
    if codes is None and not truth:
        die(f"run {run!r} has no ground truth for preset {preset.name}; run groundtruth or pass --archs")
    device = pick_device(device)
    data = load_data(preset, device, data_dir)
    st = _trained_state(run_dir, config, device)
    log = Console(ts.EventLog(run_dir / "events.jsonl"), quiet)
    wanted = list(dict.fromkeys((codes or {}).values())) if codes else list(truth)
    accs = evaluate_step(st, preset, data, [sn.decode(c) for c in wanted], log)
    results = run_results(truth, accs, ceiling, preset) if codes is None else {"evaluated": accs}
    ev.write_json_atomic(run_dir / "results.json", results)
    if out is not None:
        ev.write_challenge(out, codes, accs)
        typer.echo(f"wrote {len(codes)} archs with acc to {out}")
    if codes is None:
        print_summary(results, ev.write_report(run_dir, config, results))


@app.command()
def report(run: str = typer.Option(..., help="run name: runs/NAME")):
    """Write runs/NAME/report.md from its results.json."""
    run_dir, config, _ = load_run_config(run, RUNS)
    try:
        results = json.loads((run_dir / "results.json").read_text())
        results["metrics"]
    except (OSError, ValueError, KeyError):
        die(f"run {run!r} has no ground-truth results yet: run `nas.py evaluate --run {run}` first")
    print_summary(results, ev.write_report(run_dir, config, results))


@app.command(name="all")
def all_(preset: str = PresetOpt, run: str = typer.Option(None, help="run name (default: preset and time)"),
         tui: bool = typer.Option(False, help="watch training in the terminal UI"),
         resume: bool = typer.Option(False, help="continue the run"), stages: str = StagesOpt,
         method: str = MethodOpt, aps: str = ApsOpt, kd: bool = KdOpt, seed: int = 0, device: str = DeviceOpt,
         data_dir: Path = DataDirOpt):
    """The whole pipeline: ground truth, warm-up, APS, CPT, SSE, evaluation, report."""
    p, chosen, device, data, config = _setup(preset, stages, method, aps, kd, seed, device, data_dir)
    run = run or f"{p.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = open_run(run, config, resume, RUNS)
    if tui:
        return watch_in_tui(run_dir, run, sys.argv[2:])
    log = Console(ts.EventLog(run_dir / "events.jsonl"), quiet=False)
    log("run_start", run=run, preset=p.name, stages=list(chosen), seed=seed, resumed=resume)
    truth, ceiling = ground_truth_step(run_dir, p, data, log, p.gt_n, p.gt_twice, seed)
    st = train_run(run_dir, config, data, device, log, ev.make_probe(p, data, truth))
    accs = evaluate_step(st, p, data, [sn.decode(c) for c in truth], log)
    results = run_results(truth, accs, ceiling, p)
    ev.write_json_atomic(run_dir / "results.json", results)
    path = ev.write_report(run_dir, config, results)
    log("rank", stage="final", step=0, **{k: results["metrics"][k] for k in ("pearson", "kendall", "spearman", "n")})
    log("end", status="done", message=f"report: {path}")
    print_summary(results, path)


def watch_in_tui(run_dir: Path, run: str, args: list[str]) -> None:
    """Training in a subprocess (its output in console.log), the UI in this one."""
    import tui
    args = [a for a in args if a not in ("--tui", "--resume")]
    if "--run" not in args:
        args += ["--run", run]
    with open(run_dir / "console.log", "a") as out:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "all", *args, "--no-tui", "--resume"],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    tui.run_tui(run_dir, proc)
    if proc.poll() is None:
        typer.echo(f"training continues in the background (pid {proc.pid}); watch it with "
                   f"`python nas.py tui --run {run}`")
    elif (run_dir / "report.md").exists():
        typer.echo(f"report: {run_dir / 'report.md'}")


@app.command(name="tui")
def tui_(run: str = typer.Option(..., help="run name: runs/NAME")):
    """Attach the terminal UI to a run that is going on or finished."""
    if not (RUNS / run).is_dir():
        die(f"no run {run!r} in {RUNS}")
    import tui
    tui.run_tui(RUNS / run)


if __name__ == "__main__":
    sys.exit(app())
