"""Rank-consistent one-shot NAS: the command line.

    python nas.py all [--preset tiny|small|cifar|fashion|paper] [--tui]   the whole pipeline
    python nas.py train | groundtruth | evaluate | report                  its steps, on a run
    python nas.py search --name NAME --flops 2.5G | export --name NAME CODE --out net.pt
    python nas.py import-weights resnet48.pdparams --out DIR               the challenge's net
    python nas.py tui --name NAME                                          watch a run
    python nas.py arch CODE / sample --archs-n N                           the search space

A run lives in runs/NAME/: config.json, events.jsonl (the contract with the UI),
checkpoints/, groundtruth.json, results.json, report.md, search.jsonl and search.json. This
file parses options, calls the library modules and turns their exceptions into one line on
stderr and exit code 2.
"""

import json
import math
import random
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import typer

import evaluate
import events
import parallel
import presets
import report as reports
import search
import supernet
import trainer
from data import IMAGENET_MEAN, IMAGENET_STD, DataError, batch_part, load_data
from groundtruth import build_ground_truth, stored_ground_truth, train_static
from presets import TrainingError
from train_stages import APS_VERSIONS, METHODS, STAGES, check_candidates, check_stages

RUNS = Path("runs")
IMAGE_SHAPES = {224: supernet.NetShape(224, 3, 1000), 32: supernet.NetShape(32, 3, 10),
                28: supernet.NetShape(28, 1, 10), 14: supernet.NetShape(14, 1, 10)}

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Rank-consistent one-shot NAS on the CVPR 2022 ResNet-48 search space.")


def die(message: str, code: int = 2):
    """Bad input: one line on stderr and a non-zero exit, never a traceback. Under torchrun
    every rank exits, and rank 0 alone says why."""
    if parallel.is_main():
        typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def say(message: str, err: bool = False):
    """A line on the terminal, from rank 0 alone under torchrun."""
    if parallel.is_main():
        typer.echo(message, err=err)


def get_preset(name: str) -> presets.Preset:
    if name not in presets.PRESETS:
        die(f"unknown preset {name!r}; presets are {', '.join(presets.PRESETS)}")
    return presets.PRESETS[name]


def parse_stages(stages: str | None, method: str, init: bool = False) -> tuple[str, ...]:
    """The stage list of `--stages`, or of `--method`; with `--init` the net it names replaces
    the warm-up, as in OPPO's run."""
    if not stages:
        if method not in METHODS:
            die(f"unknown method {method!r}; methods are {', '.join(METHODS)}")
        return tuple(s for s in METHODS[method] if not (init and s == "warmup"))
    try:
        chosen = check_stages(s.strip() for s in stages.split(",") if s.strip())
    except ValueError as e:
        die(str(e))
    if init and "warmup" in chosen:
        die("--init gives the full net the warm-up would make: leave warmup out of --stages")
    return chosen


def pick_device(name: str, join: bool = True) -> str:
    """The device; under torchrun and with `join`, also joins the process group (and takes
    this rank's GPU)."""
    try:
        device = presets.pick_device(name)
        return parallel.start(device) if join else device
    except ValueError as e:
        die(str(e))


def on_main(work):
    """`work()` on rank 0 alone; its exit, if it exits, on every rank (one process decides
    about the run folder, so two never race to create or check it)."""
    result, code = None, None
    if parallel.is_main():
        try:
            result = work()
        except typer.Exit as e:
            code = e.exit_code
    code = parallel.from_main(code)
    if code is not None:
        raise typer.Exit(code)
    return parallel.from_main(result)


def check_split(batch_size: int | None = None, archs: int | None = None) -> None:
    """Bad input under torchrun: a batch the ranks cannot share evenly, or fewer archs than
    ranks (some would have nothing to do)."""
    world = parallel.world_size()
    if batch_size is not None:
        try:
            batch_part(batch_size, (0, world))
        except ValueError as e:
            die(str(e))
    if archs is not None and archs < world:
        die(f"{world} processes for {archs} archs: use at most {archs} processes")


def open_run(name: str, config: dict, resume: bool, runs: Path) -> Path:
    return on_main(lambda: open_run_folder(name, config, resume, runs))


def open_run_folder(name: str, config: dict, resume: bool, runs: Path) -> Path:
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
            die(f"{saved} is not valid JSON; start a new --name")
        if old != config:
            changed = ", ".join(presets.config_diff(old, config))
            die(f"run {name!r} was started with a different config ({changed}); "
                "resume with the same options or start a new --name")
        return run_dir
    if saved.exists():
        die(f"run {name!r} already exists in {run_dir}: pass --resume to continue it, "
            "or choose another --name")
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    presets.write_json_atomic(saved, config)
    return run_dir


def load_run_config(name: str, runs: Path) -> tuple[Path, dict, presets.Preset]:
    run_dir = runs / name
    try:
        config = json.loads((run_dir / "config.json").read_text())
        preset = presets.Preset(**config["preset"])
    except FileNotFoundError:
        die(f"no run {name!r}: {run_dir / 'config.json'} does not exist")
    except (ValueError, KeyError, TypeError):
        die(f"{run_dir / 'config.json'} is not a run config")
    return run_dir, config, preset


def load_dataset(preset: presets.Preset, device: str, data_dir: Path | None):
    downloads = preset.dataset in ("cifar10", "cifar100")  # torchvision makes their folder
    if data_dir is not None and not data_dir.is_dir() and not downloads:
        die(f"--data-dir {data_dir} is not a folder")
    presets.set_threads(preset)
    try:
        return load_data(preset, device, data_dir, channels_last=presets.channels_last(device))
    except DataError as e:
        die(str(e))


def event_log(run_dir: Path, quiet: bool) -> "Console":
    """The run's events.jsonl and the terminal; silent on every rank but 0 under torchrun."""
    main = parallel.is_main()
    return Console(events.EventLog(run_dir / "events.jsonl" if main else None), quiet or not main)


class Console:
    """The event log, echoed to the terminal: a rich progress bar per phase and for the ground
    truth, and `events.describe`'s line for the events worth a line here."""

    LINES = {"phase_end", "rank", "warning", "kd_teacher", "search"}

    def __init__(self, log: events.EventLog, quiet: bool):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeRemainingColumn)
        self.log = log
        self.quiet = quiet
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                            transient=True)
        self.task = None

    def __call__(self, event: str, **f) -> dict:
        record = self.log(event, **f)
        if self.quiet:
            return record
        if event == "phase_start":
            self._new_task(f["phase"], f["steps"], f.get("resumed_at", 0))
        elif event == "progress" and self.task is not None:
            info = f"loss {f['loss']:.3f}  {f['ips']:.0f} img/s"
            self.bar.update(self.task, completed=f["step"], info=info)
        elif event == "groundtruth":
            if f["done"] == 1 or self.task is None:
                self._new_task("ground truth", f["total"], 0)
            self.bar.update(self.task, completed=f["done"], info=f"last {f['acc']:.4f}")
        if event in self.LINES:
            if event == "phase_end":
                self._stop()
            typer.echo(events.describe(record), err=event == "warning")
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


def parse_arch(code: str) -> supernet.Arch:
    try:
        return supernet.decode(code)
    except ValueError as e:
        die(f"bad arch code {code!r}: {e}")


@app.command()
def arch(code: str = typer.Argument(..., help="52-character arch code "
                                              "(or 51 without the leading '1')"),
         image_size: int = typer.Option(224, help="input size: 224 (ImageNet), 32 (CIFAR), "
                                                  "28 or 14 (Fashion-MNIST)"),
         as_json: bool = typer.Option(False, "--json", help="print one JSON object")):
    """Decode an arch code: depths, channels of every layer, FLOPs and parameters."""
    a = parse_arch(code)
    if image_size not in IMAGE_SHAPES:
        die(f"--image-size must be one of {sorted(IMAGE_SHAPES)}, got {image_size}")
    shape = IMAGE_SHAPES[image_size]
    flops, params = supernet.count_flops_params(a, shape)
    stem = supernet.stem_channels(a, shape)
    blocks = [{"stage": b.stage + 1, "block": b.index + 1, "in": b.cin, "mid": b.mid, "out": b.cout,
               "stride": b.stride} for b in supernet.blocks_of(a, shape)]
    if as_json:
        typer.echo(json.dumps({"code": supernet.encode(a), "depths": list(a.depths), "stem": stem,
                               "blocks": blocks, "flops": flops, "params": params,
                               "image_size": image_size}))
        return
    typer.echo(f"code    {supernet.encode(a)}")
    typer.echo(f"depths  {' '.join(map(str, a.depths))}   stem {stem} channels")
    for b in blocks:
        typer.echo(f"  stage {b['stage']} block {b['block']}: {b['in']:>4} -> {b['mid']:>4} -> "
                   f"{b['out']:>4}  stride {b['stride']}")
    typer.echo(f"FLOPs   {flops / 1e9:.3f} G at {image_size} px   params {params / 1e6:.3f} M")


@app.command()
def sample(archs_n: int = typer.Option(10, "--archs-n", min=1, help="how many codes"),
           seed: int = typer.Option(0, help="random seed")):
    """Print codes sampled uniformly from the full search space."""
    rng = random.Random(seed)
    for _ in range(archs_n):
        typer.echo(supernet.encode(supernet.sample_arch(rng)))


# ---------------------------------------------------------------- the pipeline's steps

def train_run(run_dir: Path, config: dict, data, device: str, log,
              probe=None) -> trainer.TrainState:
    """Train from the run's checkpoint if it has one, else from scratch; exits cleanly on Ctrl-C."""
    st = state_of(config, device)
    ckpt = trainer.last_checkpoint(run_dir)
    try:
        if ckpt.exists():
            trainer.load_checkpoint(st, ckpt)
        return trainer.train(st, data, run_dir, log, probe, evaluate.make_scorer(st.preset, data))
    except trainer.Stopped as e:
        log("end", status="interrupted", message=f"{e}; continue with --resume")
        say(f"{e}: checkpoint {ckpt}; continue with --resume", err=True)
        raise typer.Exit(130)
    except TrainingError as e:
        log("end", status="failed", message=str(e))
        die(str(e), 1)


def ground_truth(run_dir: Path, preset: presets.Preset, data, log, n: int, seeds: int,
                 seed: int, stratified: bool = False):
    try:
        return build_ground_truth(run_dir, preset, data, log, n, seeds, seed, stratified)
    except ValueError as e:
        die(str(e))
    except TrainingError as e:
        die(str(e), 1)


def side_by_side_command(name: str, preset: presets.Preset, seed: int,
                         data_dir: Path | None) -> list[str]:
    """`nas.py groundtruth` for run `name` under torchrun, `preset.gt_processes` processes on
    one GPU (processes sharing a card talk through gloo: parallel.start)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={preset.gt_processes}", str(Path(__file__).resolve()),
            "groundtruth", "--preset", preset.name, "--name", name, "--seed", str(seed),
            "--device", "cuda", *(["--data-dir", str(data_dir)] if data_dir else [])]


def ground_truth_side_by_side(name: str, preset: presets.Preset, seed: int,
                              data_dir: Path | None) -> None:
    """Stand-alone nets are too small to fill a GPU one at a time: train the run's ground truth
    in `preset.gt_processes` processes side by side (each takes archs i = r mod n), into the
    run's groundtruth.json, where `all` then finds every net. A net already there is not
    trained again, so a run killed here goes on with --resume."""
    say(f"ground truth: {preset.gt_n} archs x {preset.gt_seeds} seeds in "
        f"{preset.gt_processes} processes on the GPU")
    code = subprocess.run(side_by_side_command(name, preset, seed, data_dir)).returncode
    if code:
        die(f"the ground truth's processes stopped (exit code {code}); the nets they finished "
            "are kept: run again with --resume", code)


def state_of(config: dict, device: str) -> trainer.TrainState:
    """The run's state before training; one line where its --init or candidate file is gone or
    changed since the run began."""
    try:
        return trainer.state_from_config(config, device)
    except (ValueError, TrainingError) as e:
        die(str(e))


def trained_state(run_dir: Path, config: dict, device: str) -> trainer.TrainState:
    st = state_of(config, device)
    ckpt = trainer.last_checkpoint(run_dir)
    if not ckpt.exists():
        die(f"run {run_dir.name!r} has no checkpoint yet ({ckpt}); train it first")
    try:
        trainer.load_checkpoint(st, ckpt)
    except TrainingError as e:
        die(str(e))
    if st.phase_index < len(st.phases()):
        say(f"warning: training of {run_dir.name!r} is not finished; "
            "evaluating the weights as they are", err=True)
    return st


def trained_run(name: str, device: str, data_dir: Path | None, join: bool = True):
    """(run folder, config, preset, data, trained state) of run `name`: what evaluate, search
    and export begin with; one line and exit 2 for anything missing."""
    run_dir, config, preset = load_run_config(name, RUNS)
    device = pick_device(device, join)
    data = load_dataset(preset, device, data_dir)
    return run_dir, config, preset, data, trained_state(run_dir, config, device)


def with_search(results: dict, run_dir: Path) -> dict:
    """The results with the run's latest search (by `all` or `search`), for the report."""
    try:
        return {**results, "search": json.loads((run_dir / "search.json").read_text())}
    except (OSError, ValueError):
        return results


def print_summary(results: dict, report: Path) -> None:
    m, c = results["metrics"], results.get("noise_ceiling")
    head = f"supernet (n={m['n']})"
    typer.echo(f"\n{'':10} {head:>26} {'ceiling (2-seed mean)':>26} {'FLOPs':>8}")
    for name in reports.METRICS:
        ceiling = reports.format_metric(c["ceiling"], name) if c else "n/a"
        typer.echo(f"{name:10} {reports.format_metric(m, name):>26} {ceiling:>26}"
                   f" {results['flops'][name]:>8.3f}")
    typer.echo(f"report: {report}")


# ---------------------------------------------------------------- commands

PresetOpt = typer.Option("cifar", help="smoke (seconds, tests), tiny (CPU smoke run), small (CPU "
                                       "rank evidence), gpu (all in ~6 min on one GPU), cifar "
                                       "(one GPU, an hour), fashion (cifar's budget on "
                                       "Fashion-MNIST) or paper (ImageNet)")
NameOpt = typer.Option(..., "--name", "-r", help="run name: runs/NAME")
StagesOpt = typer.Option(None, help="comma-separated stages to run instead of the method's: "
                                    f"{', '.join(STAGES)}")
MethodOpt = typer.Option("full", help=f"stage list: {', '.join(METHODS)}")
ApsOpt = typer.Option("v3", help="APS version: v1, v2 or v3 (the paper's best)")
KdOpt = typer.Option(True, help="SSE with distillation from the warm-up's full net (\"Dis\")")
DeviceOpt = typer.Option("auto", help="auto, cpu or cuda")
DataDirOpt = typer.Option(None, help="dataset folder (Fashion-MNIST's .gz files, CIFAR's download "
                                      "target, ImageNet's train/ and val/)")
InitOpt = typer.Option(None, help="start from this largest net instead of the warm-up, and "
                                  "distil SSE from it: the challenge's resnet48.pdparams or a "
                                  "PyTorch state dict (full-width presets: paper)")
CandidatesOpt = typer.Option(None, help="challenge-format JSON of archs that CPT and SSE walk and "
                                        "refill their pools from (default at paper: the "
                                        "challenge's 45,000; elsewhere uniform sampling)")


def run_setup(preset_name, stages, method, aps, kd, seed, device, init=None, candidates=None):
    """(preset, stages, device, config) from the options, or one line and exit 2."""
    preset = get_preset(preset_name)
    if aps not in APS_VERSIONS:
        die(f"unknown APS version {aps!r}; use v1, v2 or v3")
    chosen = parse_stages(stages, method, init is not None)
    try:
        if candidates is not None:
            preset = replace(preset, candidates=str(candidates.resolve()))
            check_candidates(chosen, supernet.read_candidates(candidates))
        start = init_of(init, preset) if init is not None else None
    except ValueError as e:
        die(str(e))
    device = pick_device(device)
    return preset, chosen, device, presets.run_config(preset, chosen, seed, aps, kd, start)


def init_of(path: Path, preset: presets.Preset) -> dict:
    """What config.json keeps of `--init FILE` once the file is known to hold the preset's
    largest net; ValueError otherwise."""
    if preset.width_mult != 1.0:
        raise ValueError(f"--init needs a full-width preset (paper); {preset.name} builds its "
                         f"nets at width x{preset.width_mult:g}")
    supernet.read_largest_net(path, preset.shape)
    return {"path": str(path.resolve()), "sha256": supernet.file_sha256(path)}


@app.command()
def train(preset: str = PresetOpt, name: str = NameOpt,
          stages: str = StagesOpt, method: str = MethodOpt, aps: str = ApsOpt, kd: bool = KdOpt,
          seed: int = 0,
          resume: bool = typer.Option(False, help="continue the run from its checkpoint"),
          device: str = DeviceOpt, data_dir: Path = DataDirOpt, init: Path = InitOpt,
          candidates: Path = CandidatesOpt, quiet: bool = False):
    """Train the supernet through the chosen stages, writing runs/NAME."""
    p, chosen, device, config = run_setup(preset, stages, method, aps, kd, seed, device, init,
                                          candidates)
    check_split(p.batch_size)
    data = load_dataset(p, device, data_dir)
    run_dir = open_run(name, config, resume, RUNS)
    log = event_log(run_dir, quiet)
    log("run_start", run=name, preset=p.name, stages=list(chosen), seed=seed, resumed=resume,
        world_size=parallel.world_size())
    train_run(run_dir, config, data, device, log)
    log("end", status="done", message="training finished")


@app.command()
def groundtruth(preset: str = PresetOpt, name: str = NameOpt,
                archs_n: int = typer.Option(None, "--archs-n", min=3,
                                            help="archs to train (default: the preset's)"),
                seeds: int = typer.Option(None, min=1, max=2,
                                          help="seeds per arch (default: the preset's); the "
                                               "truth is their mean, 2 give the noise ceiling"),
                stratified: bool = typer.Option(False, help="one arch per FLOPs stratum instead "
                                                            "of uniform (inflates correlations)"),
                seed: int = 0, device: str = DeviceOpt, data_dir: Path = DataDirOpt,
                quiet: bool = False):
    """Train archs stand-alone (cached in runs/NAME/groundtruth.json); report the noise ceiling."""
    p = get_preset(preset)
    device = pick_device(device)
    n = archs_n or p.gt_n
    check_split(archs=n)
    data = load_dataset(p, device, data_dir)
    run_dir = RUNS / name
    run_dir.mkdir(parents=True, exist_ok=True)
    log = event_log(run_dir, quiet)
    truth, ceiling = ground_truth(run_dir, p, data, log, n, seeds or p.gt_seeds, seed, stratified)
    say(f"{len(truth)} archs in {run_dir / 'groundtruth.json'}; "
        f"{reports.READINGS[p.gt_reading][0]} {min(truth.values()):.4f} .. "
        f"{max(truth.values()):.4f}")
    if ceiling:
        for label, m in (("seed vs seed", ceiling["seed_vs_seed"]),
                         ("ceiling for a predictor of the 2-seed mean", ceiling["ceiling"])):
            metrics = "  ".join(f"{k} {reports.format_metric(m, k)}" for k in reports.METRICS)
            say(f"{label}: {metrics}  (n = {m['n']})")


@app.command(name="evaluate")
def evaluate_cmd(name: str = NameOpt,
                 archs: Path = typer.Option(None,
                                            help="challenge-format JSON of archs to evaluate"),
                 out: Path = typer.Option(None,
                                          help="write the archs file back with acc filled in"),
                 device: str = DeviceOpt, data_dir: Path = DataDirOpt, quiet: bool = False):
    """Evaluate archs with the trained supernet (BN recalibrated per arch); write results.json."""
    codes = None
    if archs is not None:
        try:
            codes = supernet.read_challenge(archs)
        except ValueError as e:
            die(str(e))
    elif out is not None:
        die("--out needs --archs: the challenge file to fill in")
    run_dir, config, preset, data, st = trained_run(name, device, data_dir)
    try:
        truth, ceiling = stored_ground_truth(run_dir, preset, data.device)
    except ValueError as e:
        die(str(e))
    if codes is None and not truth:
        die(f"run {name!r} has no ground truth for preset {preset.name}; "
            "run groundtruth or pass --archs")
    wanted = list(dict.fromkeys(codes.values())) if codes else list(truth)
    check_split(archs=len(wanted))
    log = event_log(run_dir, quiet)
    accs = evaluate.evaluate_run(st, data, [supernet.decode(c) for c in wanted], log)
    if not parallel.is_main():
        return
    if codes is None:
        results = reports.run_results(truth, accs, ceiling, preset)
    else:
        results = {"evaluated": accs}
    presets.write_json_atomic(run_dir / "results.json", results)
    if out is not None:
        reports.write_challenge(out, codes, accs)
        typer.echo(f"wrote {len(codes)} archs with acc to {out}")
    if codes is None:
        print_summary(results, reports.write_report(run_dir, config,
                                                     with_search(results, run_dir)))


@app.command()
def report(name: str = NameOpt):
    """Write runs/NAME/report.md from its results.json."""
    run_dir, config, _ = load_run_config(name, RUNS)
    try:
        results = json.loads((run_dir / "results.json").read_text())
        results["metrics"]
    except (OSError, ValueError, KeyError):
        die(f"run {name!r} has no ground-truth results yet: "
            f"run `nas.py evaluate --name {name}` first")
    try:
        path = reports.write_report(run_dir, config, with_search(results, run_dir))
    except (KeyError, TypeError, ValueError):
        die(f"{run_dir / 'results.json'} was written by another version: "
            f"run `nas.py evaluate --name {name}` again")
    print_summary(results, path)


@app.command(name="all")
def all_(preset: str = PresetOpt,
         name: str = typer.Option(None, "--name", "-r", help="run name (default: preset and time)"),
         tui: bool = typer.Option(False, help="watch training in the terminal UI"),
         resume: bool = typer.Option(False, help="continue the run"), stages: str = StagesOpt,
         method: str = MethodOpt, aps: str = ApsOpt, kd: bool = KdOpt, seed: int = 0,
         device: str = DeviceOpt, data_dir: Path = DataDirOpt, init: Path = InitOpt,
         candidates: Path = CandidatesOpt):
    """The whole pipeline: ground truth, warm-up, APS, CPT, SSE, evaluation, report."""
    p, chosen, device, config = run_setup(preset, stages, method, aps, kd, seed, device, init,
                                          candidates)
    name = parallel.from_main(name or f"{p.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    if tui:  # the UI process only watches: the data and the device are the trainer's
        return watch_in_tui(open_run(name, config, resume, RUNS), name, sys.argv[2:])
    check_split(p.batch_size, p.gt_n)
    data = load_dataset(p, device, data_dir)
    run_dir = open_run(name, config, resume, RUNS)
    log = event_log(run_dir, quiet=False)
    log("run_start", run=name, preset=p.name, stages=list(chosen), seed=seed, resumed=resume,
        world_size=parallel.world_size())
    log("plan", phases=trainer.phase_plan(p, chosen, aps, data.train_size))
    if p.gt_processes > 1 and device == "cuda" and parallel.world_size() == 1:
        ground_truth_side_by_side(name, p, seed, data_dir)
    truth, ceiling = ground_truth(run_dir, p, data, log, p.gt_n, p.gt_seeds, seed)
    st = train_run(run_dir, config, data, device, log, evaluate.make_probe(p, data, truth))
    accs = evaluate.evaluate_run(st, data, [supernet.decode(c) for c in truth], log)
    if not parallel.is_main():
        return  # the rest (results, report, the search) is one process's work
    results = reports.run_results(truth, accs, ceiling, p)
    presets.write_json_atomic(run_dir / "results.json", results)
    path = reports.write_report(run_dir, config, results)
    final = {k: results["metrics"][k] for k in ("pearson", "kendall", "spearman", "n")}
    log("rank", stage="final", step=0, **final, points=evaluate.scatter_points(accs, truth))
    try:
        results["search"] = search.run_search(st, data, run_dir, search.default_budget(),
                                              search.ALL_POPULATION, search.ALL_GENERATIONS,
                                              seed, log)
    except ValueError as e:
        die(str(e))
    presets.write_json_atomic(run_dir / "results.json", results)
    path = reports.write_report(run_dir, config, results)
    log("results", report=str(path), **reports.results_table(results))
    log("end", status="done", message=f"report: {path}")
    print_summary(results, path)
    print_search(results["search"], run_dir)



def parse_budget(flops: str | None, params: str | None,
                 latency_ms: float | None) -> search.Budget:
    try:
        budget = search.Budget(
            flops=search.parse_amount(flops, "--flops") if flops is not None else None,
            params=search.parse_amount(params, "--params") if params is not None else None,
            latency_ms=latency_ms)
        if latency_ms is not None and not latency_ms > 0:
            raise ValueError(f"--latency-ms must be positive, got {latency_ms:g}")
        search.check_budget(budget)
    except ValueError as e:
        die(str(e))
    return budget


def print_search(summary: dict, run_dir: Path) -> None:
    best = summary["best"]
    if best is None:
        typer.echo(f"search: no evaluated arch meets {summary['budget']}")
        return
    typer.echo(f"best under {summary['budget']} ({summary['evaluated']} archs evaluated): "
               f"{best['arch']}  top-1 {best['top1']:.4f}  {best['flops'] / 1e9:.3f} GFLOPs "
               f"({best['preset_flops'] / 1e6:.2f} MFLOPs at this preset)")
    typer.echo(f"search: {run_dir / 'search.json'}, {run_dir / 'search.png'}")


@app.command(name="search")
def search_cmd(name: str = NameOpt,
               flops: str = typer.Option(None, help="FLOPs budget in the challenge's units "
                                                    "(full width at 224 px), e.g. 2.5G"),
               params: str = typer.Option(None, help="parameter budget, same units, e.g. 8M"),
               latency_ms: float = typer.Option(None, help="latency budget on this machine "
                                                           "(batch 1, the preset's net)"),
               population: int = typer.Option(50, min=4, help="archs per generation"),
               generations: int = typer.Option(20, min=0, help="generations after the first, "
                                                               "uniform one (0: only that)"),
               seed: int = 0, device: str = DeviceOpt, data_dir: Path = DataDirOpt,
               quiet: bool = False):
    """Evolutionary search for the best subnet under a budget (search.json, search.png)."""
    budget = parse_budget(flops, params, latency_ms)
    if not parallel.is_main():
        return  # one process's work: under torchrun, rank 0 searches and the others stop
    run_dir, _, _, data, st = trained_run(name, device, data_dir, join=False)
    log = event_log(run_dir, quiet)
    try:
        summary = search.run_search(st, data, run_dir, budget, population, generations, seed, log)
    except ValueError as e:
        die(str(e))
    print_search(summary, run_dir)


@app.command()
def export(name: str = NameOpt, code: str = typer.Argument(..., help="the arch to export"),
           out: Path = typer.Option(..., help="net.pt; the torch.export program goes beside "
                                              "it as net.pt2"),
           finetune: float = typer.Option(0.0, min=0.0, help="epochs of stand-alone training "
                                                             "after inheriting"),
           seed: int = 0, device: str = DeviceOpt, data_dir: Path = DataDirOpt):
    """Write a subnet with inherited weights and recalibrated BN, optionally fine-tuned."""
    arch = parse_arch(code)
    if out.suffix == ".pt2":
        die(f"--out {out}: the program goes beside it as .pt2; name the state file .pt")
    if not math.isfinite(finetune):
        die(f"--finetune must be a finite number of epochs, got {finetune}")
    if out.exists():
        die(f"{out} exists; choose another --out")
    if not out.parent.is_dir():
        die(f"--out {out}: folder {out.parent} does not exist")
    if not parallel.is_main():
        return  # one process's work: under torchrun, rank 0 exports and the others stop
    run_dir, config, preset, data, st = trained_run(name, device, data_dir, join=False)
    calib = data.calib_batches(preset.calib_batches, preset.calib_batch_size, seed=0)
    net = search.inherited_subnet(st, arch, calib)
    top1 = evaluate.accuracy(net, None, data.eval_batches(preset.eval_subset))
    typer.echo(f"top-1 with inherited weights: {top1:.4f}")
    state = out.with_name(out.name + ".finetune")
    if finetune:
        try:
            train_static(net, preset, data, seed, finetune, checkpoint=state,
                                  what=f"{supernet.encode(arch)} of run {name}")
        except KeyboardInterrupt:
            die(f"interrupted: run the same command again to go on from {state}", 130)
        except ValueError as e:
            die(str(e))
        except TrainingError as e:
            die(str(e), 1)
        evaluate.calibrate_bn(net, None, calib)  # exact statistics for the weights it ends with
        top1 = evaluate.accuracy(net, None, data.eval_batches(preset.eval_subset))
        typer.echo(f"top-1 after {finetune:g} epochs of fine-tuning: {top1:.4f}")
    paths = search.save_export(out, net, preset, data.mean, data.std)
    state.unlink(missing_ok=True)  # only once the result is safe
    typer.echo(f"wrote {paths[0]} (StaticNet state) and {paths[1]} (torch.export program)")


@app.command(name="import-weights")
def import_weights(file: Path = typer.Argument(..., help="the challenge's resnet48.pdparams, or a "
                                                         "PyTorch state dict of the largest net"),
                   out: Path = typer.Option(..., help="folder for net.pt and net.pt2")):
    """Write the challenge's pretrained ResNet-48 as `export` writes a subnet (net.pt, net.pt2).

    net.pt holds StaticNet's state of the largest arch at the paper preset's shape; net.pt2 is
    a torch.export program on [0, 1] images that needs nothing of this repository."""
    preset = presets.PRESETS["paper"]
    if (out / "net.pt").exists() or (out / "net.pt2").exists():
        die(f"{out} already holds net.pt or net.pt2; choose another --out")
    try:
        weights = supernet.read_largest_net(file, preset.shape)
    except ValueError as e:
        die(str(e))
    net = supernet.StaticNet(supernet.MAX_ARCH, preset.shape)
    net.load_state_dict(weights)
    out.mkdir(parents=True, exist_ok=True)
    mean, std = (torch.tensor(v) for v in (IMAGENET_MEAN, IMAGENET_STD))
    paths = search.save_export(out / "net.pt", net, preset, mean, std)
    typer.echo(f"wrote {paths[0]} (StaticNet state) and {paths[1]} (torch.export program)")


def watch_in_tui(run_dir: Path, name: str, args: list[str]) -> None:
    """Training in a subprocess (its output in console.log), the UI in this one."""
    import tui
    args = [a for a in args if a not in ("--tui", "--resume")]
    if "--name" not in args and "-r" not in args:
        args += ["--name", name]
    command = [sys.executable, str(Path(__file__).resolve()), "all", *args, "--no-tui", "--resume"]
    with open(run_dir / "console.log", "a") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    tui.run_tui(run_dir, proc)
    if proc.poll() is not None and (run_dir / "report.md").exists():
        typer.echo(f"report: {run_dir / 'report.md'}")


@app.command(name="tui")
def tui_(name: str = NameOpt):
    """Attach the terminal UI to a run that is going on or finished."""
    if not (RUNS / name).is_dir():
        die(f"no run {name!r} in {RUNS}")
    import tui
    tui.run_tui(RUNS / name)


def main():
    """The app; under torchrun, a peer that died ends this rank with one line, not a trace."""
    try:
        return app()
    except torch.distributed.DistError as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        typer.echo(f"error: rank {parallel.rank()}: another process of this run stopped "
                   f"({first}); continue with --resume", err=True)
        return 1
    finally:
        parallel.stop()


if __name__ == "__main__":
    sys.exit(main())
