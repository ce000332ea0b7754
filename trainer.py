"""The training loop and its checkpoint: every phase of a run's stages, resumable at any step.

`train` walks the phases that train_stages gives for the run's stage list. Each step samples
and runs the stage's archs (the stage's `step`), averages the gradients over torchrun's
processes, and takes one optimizer step; every `log_every` steps it logs progress, checks the
losses and, under torchrun, that every process sampled the same archs. Ctrl-C stops after the
step with a checkpoint. Everything the run depends on is in `TrainState`, and its
`state_dict` is the checkpoint: the supernet, the optimizer, the position, the arch RNG, CPT's
pool, SSE's sub-supernets and Π-NAS's teacher and queue.
"""

import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import parallel
import supernet
from data import mix_seed
from pinas import PiNAS
from presets import (Preset, TrainingError, channels_last, config_diff, lr_at,
                     preset_from_config, replace_atomically, run_config)
from train_stages import (RUNNABLE, SPLITS, ConstraintPool, Phase, SubSupernets,
                          check_candidates, check_stages, phase_length, stage_phases)

ROOT = Path(__file__).resolve().parent  # a preset's candidate file is relative to it


class Stopped(Exception):
    """Ctrl-C: a checkpoint was written and the run can be resumed."""


@dataclass
class TrainState:
    """Everything a checkpoint holds, and the run's options."""

    preset: Preset
    stages: tuple
    seed: int
    aps: str = "v3"
    kd: bool = True
    init: dict | None = None      # {"path", "sha256"} of the net it started from (`--init`)
    net: supernet.Supernet = None
    optimizer: torch.optim.Optimizer | None = None   # the current phase's; None between phases
    phase_index: int = 0          # into the flat list of all stages' phases
    step: int = 0                 # within that phase
    rng: random.Random = None     # every arch sampled, every pool and SSE decision
    pool: ConstraintPool = field(default_factory=ConstraintPool)
    warmup_weights: dict | None = None  # the warm-up's (or --init's) full net: SSE's teacher
    sse: SubSupernets | None = None     # after an SSE stage split the supernet
    pinas: PiNAS | None = None          # while a Π-NAS stage runs
    candidates: tuple | None = None     # the archs CPT and SSE walk (preset.candidates)
    phase_steps: int = 0                # the current phase's length, set as it starts
    derived: dict = field(default_factory=dict)  # caches of what the fields above determine
    stop_requested: bool = False

    def config(self) -> dict:
        return run_config(self.preset, self.stages, self.seed, self.aps, self.kd, self.init)

    def phases(self) -> list[Phase]:
        return [p for s in self.stages for p in stage_phases(s, self.preset, self.aps)]

    def device(self) -> torch.device:
        return self.net.fc.weight.device

    def state_dict(self) -> dict:
        """The checkpoint: every field a resumed run needs, each part its own state dict."""
        return {"config": self.config(), "phase_index": self.phase_index, "step": self.step,
                "net": self.net.state_dict(),
                "optimizer": self.optimizer.state_dict() if self.optimizer else None,
                "rng": self.rng.getstate(), "pool": self.pool.state_dict(),
                "warmup_weights": self.warmup_weights,
                "sse": self.sse.state_dict() if self.sse else None,
                "pinas": self.pinas.state_dict() if self.pinas else None}

    def load_state_dict(self, blob: dict) -> None:
        self.net.load_state_dict(blob["net"])
        self.phase_index, self.step = blob["phase_index"], blob["step"]
        self.rng.setstate(_as_tuple(blob["rng"]))
        self.pool.load_state_dict(blob["pool"])
        self.warmup_weights = blob["warmup_weights"]
        self.sse = None
        if blob["sse"] is not None:
            self.sse = SubSupernets(blob["sse"]["stage"])
            self.sse.load_state_dict(blob["sse"])
        self.pinas = None
        if blob["pinas"] is not None:
            self.pinas = PiNAS(self.net, self.preset.queue_size, self.seed)
            self.pinas.load_state_dict(blob["pinas"])
        self.optimizer = None
        if blob["optimizer"] is not None:
            phase = self.phases()[self.phase_index]
            self.optimizer = make_optimizer(RUNNABLE[phase.stage].params(self), 0.0, 0.0)
            self.optimizer.load_state_dict(blob["optimizer"])  # its lr and weight decay too


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def new_state(preset: Preset, stages, seed: int, device, aps: str = "v3",
              kd: bool = True, init: dict | None = None) -> TrainState:
    """A run's state before its first step. `init` ({"path", "sha256"}): the supernet starts
    from that largest net, which is also SSE's teacher; ValueError where the file is not that
    net at the preset's shape, or not the file the run was started with."""
    stages = check_stages(stages)
    candidates = None
    if preset.candidates:
        candidates = supernet.read_candidates(ROOT / preset.candidates)
        check_candidates(stages, candidates)
    torch.manual_seed(seed)
    net = supernet.Supernet(preset.shape)
    warm = None
    if init is not None:
        if supernet.file_sha256(init["path"]) != init["sha256"]:
            raise ValueError(f"{init['path']} is not the file this run started from "
                             "(its sha256 differs)")
        warm = supernet.read_largest_net(init["path"], preset.shape)
        supernet.load_largest(net, warm)
    net = net.to(device)
    if channels_last(device):
        net = net.to(memory_format=torch.channels_last)
    warm = {k: v.to(device) for k, v in warm.items()} if warm else None
    return TrainState(preset, stages, seed, aps, kd, init, net, rng=random.Random(seed),
                      warmup_weights=warm, candidates=candidates)


def state_from_config(config: dict, device) -> TrainState:
    preset = preset_from_config(config)
    return new_state(preset, config["stages"], config["seed"], device, config["aps"],
                     config["kd"], config.get("init"))


def make_optimizer(params, lr: float, weight_decay: float = 3e-5) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)


# ---------------------------------------------------------------- checkpoints

def last_checkpoint(run_dir: Path) -> Path:
    """Where a run keeps the checkpoint it resumes from."""
    return run_dir / "checkpoints" / "last.pt"


def save_checkpoint(st: TrainState, path: Path) -> None:
    """Atomic: a crash while writing leaves the previous checkpoint whole. Every rank calls it
    at the same step; their BN statistics are averaged, then rank 0 alone writes."""
    teacher = st.pinas.mean_teacher if st.pinas else None
    parallel.average_buffers(*[m for m in (st.net, teacher) if m is not None])
    if not parallel.is_main():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = st.state_dict()
    replace_atomically(path, lambda tmp: torch.save(blob, tmp))


def load_checkpoint(st: TrainState, path: Path, extend: bool = False) -> None:
    """Restore `st` from `path`; TrainingError when it is unreadable, from another version or
    from another config.

    With `extend`, the checkpoint may also be a finished run whose stages begin st's, so st goes
    on where it ended (the ablation's chains: +CPT starts where APS_v3 ended). Options only
    later stages use (the APS version before aps_depth, KD before SSE) may then differ.
    """
    try:
        blob = torch.load(path, map_location=st.device(), weights_only=True)
        config = blob["config"]
    except Exception as e:
        raise TrainingError(f"checkpoint {path} cannot be read ({type(e).__name__}): "
                            "it is damaged or not ours")
    missing = st.state_dict().keys() - blob.keys()
    if missing:
        raise TrainingError(f"checkpoint {path} lacks {', '.join(sorted(missing))}: "
                            "another version of this program wrote it")
    if config != st.config() and not (extend and finished_run_begins(config,
                                                                     blob["phase_index"], st)):
        raise TrainingError(f"checkpoint {path} was made with a different config "
                            f"({', '.join(config_diff(config, st.config()))}); "
                            "resume with the same options or start a new --run")
    st.load_state_dict(blob)


def finished_run_begins(config: dict, phase_index: int, st: TrainState) -> bool:
    """Whether a run of `config`, finished at `phase_index`, is the beginning of st's run."""
    stages = tuple(config["stages"])
    finished = phase_index == sum(len(stage_phases(s, st.preset, config["aps"])) for s in stages)
    unused = {"stages"}
    if "aps_depth" not in stages:
        unused.add("aps")
    if not set(SPLITS) & set(stages):
        unused.add("kd")
    same_start = st.stages[:len(stages)] == stages
    return finished and same_start and set(config_diff(config, st.config())) <= unused


# ---------------------------------------------------------------- the loop

def train(st: TrainState, data, run_dir: Path | None, log, probe=None, score=None) -> TrainState:
    """Run every phase of `st.stages` from the state's position; checkpoint as it goes.

    `probe(st)` (optional) returns rank metrics of a probe set, logged as `rank` events every
    `preset.probe_every` steps and at every phase end. `score(net)` (optional) is the top-1 of
    a static net with its BN recalibrated: SSE uses it to choose its distillation teacher.
    Ctrl-C finishes the current step, writes a checkpoint and raises Stopped; a second Ctrl-C
    interrupts at once.
    """
    phases = st.phases()
    ckpt = last_checkpoint(run_dir) if run_dir else None
    previous = signal.getsignal(signal.SIGINT)

    def on_sigint(signum, frame):
        if st.stop_requested:
            raise KeyboardInterrupt
        st.stop_requested = True

    signal.signal(signal.SIGINT, on_sigint)
    log("plan", phases=phase_plan(st.preset, st.stages, st.aps, data.train_size))
    stage_started = time.perf_counter()  # a resumed stage counts from the resume
    try:
        while st.phase_index < len(phases):
            phase = phases[st.phase_index]
            stage = RUNNABLE[phase.stage]
            before = phases[st.phase_index - 1] if st.phase_index > 0 else None
            after = phases[st.phase_index + 1] if st.phase_index + 1 < len(phases) else None
            first = before is None or before.stage != phase.stage
            last = after is None or after.stage != phase.stage
            if first:
                stage_started = time.perf_counter()
                if st.step == 0:
                    log("stage_start", stage=phase.stage)
            run_phase(st, phase, data, log, ckpt, probe if stage.probes else None, score)
            parallel.average_buffers(st.net)  # so every rank keeps (and copies) the same net
            if stage.end:
                stage.end(st, phase, last)
            st.optimizer = None
            st.phase_index += 1
            st.step = 0
            if ckpt:
                save_checkpoint(st, ckpt)
                if last:
                    save_checkpoint(st, ckpt.with_name(f"{phase.stage}.pt"))
                log("checkpoint", path=str(ckpt), stage=phase.stage, phase=phase.name, step=0)
            if last:
                log("stage_end", stage=phase.stage, seconds=time.perf_counter() - stage_started)
    finally:
        signal.signal(signal.SIGINT, previous)
    return st


def phase_plan(preset: Preset, stages, aps: str, train_size: int) -> list[dict]:
    """Every phase of a run with its paths per step and steps: what the UI's ETA needs."""
    return [{"stage": p.stage, "phase": p.name, "k": p.k,
             "steps": phase_length(p, preset, train_size)}
            for s in stages for p in stage_phases(s, preset, aps)]


def train_step(st: TrainState, phase: Phase, data, key: int):
    """One optimizer step's forward/backward work: (archs run, their losses)."""
    stage = RUNNABLE[phase.stage]
    x, y = data.train_batch(key, st.step, st.preset.batch_size, parallel.part())
    if stage.labels:
        return stage.step(st, phase, x, y)
    return stage.step(st, phase, x, (data.mean, data.std))


def run_phase(st: TrainState, phase: Phase, data, log, ckpt: Path | None, probe,
              score=None) -> None:
    """The loop of one phase: lr, step, log, checkpoint, probe, and Ctrl-C."""
    preset, stage = st.preset, RUNNABLE[phase.stage]
    steps = st.phase_steps = phase_length(phase, preset, data.train_size)
    log("phase_start", stage=phase.stage, phase=phase.name, index=st.phase_index + 1,
        of=len(st.phases()), steps=steps, lr=phase.lr, k=phase.k, space=phase.space(),
        sub=phase.sub, resumed_at=st.step)
    if stage.begin:
        stage.begin(st, phase, log, score)
    if st.optimizer is None:
        st.optimizer = make_optimizer(stage.params(st), phase.lr, stage.weight_decay)
    key = mix_seed(st.seed, st.phase_index)
    pending, seen, loss = [], 0, None
    t0 = started = time.perf_counter()
    st.net.train()
    while st.step < steps:
        for group in st.optimizer.param_groups:
            group["lr"] = lr_at(st.step, steps, phase.lr)
        st.optimizer.zero_grad(set_to_none=True)
        archs, losses = train_step(st, phase, data, key)
        parallel.average_gradients(stage.params(st))
        st.optimizer.step()
        if stage.after_step:
            stage.after_step(st, archs)
        st.step += 1
        seen += preset.batch_size * len(archs)
        pending.append((archs, torch.stack(losses)))
        at_log = st.step % preset.log_every == 0 or st.step == steps
        if at_log or (st.stop_requested and parallel.world_size() == 1):
            check_same_archs(pending, phase, st.step)
            loss = check_finite(pending, phase, st.step)
            ips = seen / max(time.perf_counter() - t0, 1e-9)
            extras = stage.extras(st) if stage.extras else {}
            log("progress", stage=phase.stage, phase=phase.name, step=st.step, steps=steps,
                loss=loss, lr=st.optimizer.param_groups[0]["lr"], ips=ips,
                epoch=st.step * preset.batch_size / data.train_size, **extras)
            if stage.uses_pool:
                log("pool", stage=phase.stage, step=st.step, **st.pool.stats())
            pending, seen, t0 = [], 0, time.perf_counter()
        if agreed_stop(st, at_log):
            if ckpt:
                save_checkpoint(st, ckpt)
                log("checkpoint", path=str(ckpt), stage=phase.stage, phase=phase.name, step=st.step)
            raise Stopped(f"stopped in {phase.name} at step {st.step}/{steps}")
        if ckpt and _every(st.step, preset.checkpoint_every, steps):
            save_checkpoint(st, ckpt)
            log("checkpoint", path=str(ckpt), stage=phase.stage, phase=phase.name, step=st.step)
        if probe and _every(st.step, preset.probe_every, steps):
            log_probe(st, phase, probe, log)
    log("phase_end", stage=phase.stage, phase=phase.name, loss=loss,
        seconds=time.perf_counter() - started)
    if probe:
        log_probe(st, phase, probe, log)


def _every(step: int, interval: int, steps: int) -> bool:
    """Whether an interval's work falls after this step (not after the last: phase end does it)."""
    return bool(interval) and step % interval == 0 and step < steps


def log_probe(st: TrainState, phase: Phase, probe, log) -> None:
    metrics = probe(st)
    st.net.train()
    if metrics:
        log("rank", stage=phase.stage, phase=phase.name, step=st.step, **metrics)


def agreed_stop(st: TrainState, at_log: bool) -> bool:
    """Whether to stop after this step: at once after Ctrl-C in one process; under torchrun
    at the next log step, once any rank has seen it, so that all stop at the same step."""
    if parallel.world_size() == 1:
        return st.stop_requested
    return at_log and parallel.any_rank(st.stop_requested)


def check_same_archs(pending, phase: Phase, step: int) -> None:
    """Under torchrun: TrainingError on every rank when the ranks trained different archs
    since the last check (only a hash of their codes travels)."""
    if parallel.world_size() == 1:
        return
    codes = ",".join(supernet.encode(a) for archs, _ in pending for a in archs)
    ranks = parallel.differing_ranks(codes)
    if ranks:
        raise TrainingError(f"ranks {ranks} sampled other archs than rank 0 in {phase.name} "
                            f"before step {step}: their arch RNGs went apart")


def check_finite(pending, phase: Phase, step: int) -> float:
    """Mean loss since the last check, over all ranks; TrainingError naming stage and arch on
    NaN/inf (on every rank: the losses are averaged first).

    Checked only every `log_every` steps, so the GPU is never made to wait in between.
    """
    losses = parallel.mean_over_ranks(torch.cat([l.float() for _, l in pending]))
    if not torch.isfinite(losses).all():
        per_step = losses.split([len(l) for _, l in pending])
        for i, ((archs, _), l) in enumerate(zip(pending, per_step)):
            bad = (~torch.isfinite(l)).nonzero()
            if len(bad):
                at = step - len(pending) + i + 1
                arch = supernet.encode(archs[int(bad[0])])
                raise TrainingError(f"non-finite loss in stage {phase.stage} "
                                    f"({phase.name}, step {at}) for arch {arch}")
    return losses.mean().item()
