"""Live view of a training run: follows `runs/<name>/events.jsonl` and shows it in Textual.

The event log is the only thing this module knows about the program: of ours it imports only
events.py (the log's vocabulary and its one-line descriptions), so it can attach to a run
written by another process, or to one that has finished. The log may still be being written,
may hold events this version does not know, and old events may lack fields, so every field is
read with `.get` and formatted defensively.

`RunState` folds the events into what the panels show; the text, the ETA, the timeline and
the rank series are functions of it. Where the terminal is short (80 x 24) the plots give way
to the latest values and a sparkline each (`NasApp.fit_to`). With `process` given, the UI owns the training subprocess (`TrainerControl`):
`q` asks once more, then sends SIGINT (the trainer saves a checkpoint and writes an `end`
event) and waits for it to exit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from textual.app import App, ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import DataTable, Footer, Log, ProgressBar, Sparkline, Static
from textual_plotext import PlotextPlot

from events import clock as _clock, describe, finite as _finite, is_number as _is_num, num as _num

POLL_SECONDS = 0.5
CONFIRM_SECONDS = 5.0
QUIET_SECONDS = 60.0  # a run this long without events is maybe not running any more: say so
COMPACT_BELOW = 30  # terminal rows under which the plots give way to sparklines
END_WORDS = {"done": "finished", "interrupted": "interrupted", "failed": "failed"}
CONFIRM_TEXT = "press q again to stop training (saves a checkpoint)"
GROUND_TRUTH_EVENTS = ("groundtruth", "groundtruth_step")


def _ago(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


def _pairs(value) -> list:
    """The [x, y] pairs of a list, leaving out anything else."""
    if not isinstance(value, list):
        return []
    return [p for p in value if isinstance(p, list) and len(p) == 2
            and _finite(p[0]) and _finite(p[1])]


def _codes(codes) -> str:
    """Allowed width codes of one stage: [1, 2, 3] -> '1-3' (contiguous is the usual case)."""
    nums = sorted(int(c) for c in codes)
    if len(nums) > 1 and nums == list(range(nums[0], nums[-1] + 1)):
        return f"{nums[0]}-{nums[-1]}"
    return ",".join(map(str, nums))


def format_space(space) -> list[str]:
    """The sampling space as two compact lines: depth ranges and width codes per stage."""
    if not isinstance(space, dict):
        return []
    try:
        depths = "".join(f"[{lo},{hi}]" for lo, hi in space.get("depths") or [])
        widths = "|".join(_codes(w) for w in space.get("widths") or [])
    except (TypeError, ValueError):  # a log of another version, or a damaged line
        return []
    return [f"D {depths}", f"W {widths}"]


class EventTail:
    """Returns the complete lines appended to a JSONL file since the previous read."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.partial = b""  # a last line still being written, kept until its newline arrives
        self.bad_lines = 0

    def read(self) -> list[dict]:
        try:
            with self.path.open("rb") as f:
                if os.fstat(f.fileno()).st_size < self.offset:  # the log was rewritten: start over
                    self.offset, self.partial = 0, b""
                f.seek(self.offset)
                chunk = f.read()
        except OSError:  # not created yet: the trainer may still be starting
            return []
        self.offset += len(chunk)
        *lines, self.partial = (self.partial + chunk).split(b"\n")
        return [event for event in map(self._parse, lines) if event is not None]

    def _parse(self, line: bytes) -> dict | None:
        if not line.strip():
            return None
        try:
            event = json.loads(line)
        except ValueError:  # includes bad UTF-8
            event = None
        if not isinstance(event, dict):
            self.bad_lines += 1
            return None
        return event


class RunState:
    """What the panels show, folded from the events seen so far: `apply` only stores what an
    event says; the text and the ETA are functions of the state below."""

    def __init__(self, name: str):
        self.name = name
        self.stage = self.phase_name = ""
        self.phase: dict = {}  # latest phase_start
        self.progress: dict = {}  # latest progress within that phase
        self.activity: dict = {}  # latest groundtruth/evaluate/search: shown instead of training
        self.gt_rows: list[dict] = []  # finished stand-alone nets, in the order they finished
        self.plan: list[dict] = []  # every phase of the training run: stage, phase, steps
        self.stage_seconds: dict[str, float] = {}  # finished stages
        self.rates: dict[str, float] = {}  # measured seconds per step, by phase
        self.phase_clock: tuple[float, int] | None = None  # (time, step) the phase began at
        self.points: list = []  # [supernet, truth] per arch, from the latest rank event
        self.rank_events: list[dict] = []  # every rank event: the running rank correlation
        self.front: list = []  # [GFLOPs, top-1] of the search's Pareto front so far
        self.results: dict = {}  # the final table
        self.pool: dict = {}
        self.pool_means: list[float] = []
        self.rank: dict = {}
        self.ceiling: dict = {}
        self.end: dict | None = None
        self.last_time: float | None = None

    def apply(self, event: dict) -> None:
        handler = self.HANDLERS.get(str(event.get("event")))
        if handler is None:  # unknown (newer) event: not ours to show
            return
        if _finite(event.get("time")):
            self.last_time = event["time"]
        try:
            handler(self, event)
        except (TypeError, ValueError, AttributeError, OverflowError):  # odd fields: skip the event
            pass

    def _run_start(self, e: dict) -> None:
        """A run, or a resumed one: what was said of an earlier start no longer holds."""
        self.name = e.get("run") or self.name
        self.end, self.plan, self.activity, self.results = None, [], {}, {}
        self.gt_rows = []  # a resumed `all` logs its ground truth again

    def _stage_start(self, e: dict) -> None:
        self.stage, self.phase_name = e.get("stage", ""), ""

    def _phase_start(self, e: dict) -> None:
        self.stage, self.phase_name = e.get("stage", ""), e.get("phase", "")
        self.phase, self.progress, self.activity = e, {}, {}
        resumed_at = e.get("resumed_at") if _finite(e.get("resumed_at")) else 0
        self.phase_clock = (e["time"], resumed_at) if _finite(e.get("time")) else None

    def _progress(self, e: dict) -> None:
        self.stage = e.get("stage", self.stage)
        self.phase_name = e.get("phase", self.phase_name)
        if self.phase_clock and _finite(e.get("time")) and _finite(e.get("step")):
            t0, step0 = self.phase_clock
            if e["step"] > step0:
                self.rates[self.phase_name] = (e["time"] - t0) / (e["step"] - step0)
        self.progress, self.activity = e, {}

    def _activity(self, e: dict) -> None:
        """Ground truth, evaluation and search: shown in the phase panel instead of training."""
        self.stage = "ground truth" if e.get("event") in GROUND_TRUTH_EVENTS else e.get("event")
        self.phase_name, self.activity = "", e

    def _search(self, e: dict) -> None:
        """The search's Pareto front so far takes the scatter: GFLOPs (x) against top-1 (y)."""
        self._activity(e)
        self.front = _pairs(e.get("front"))

    def _groundtruth(self, e: dict) -> None:
        self._activity(e)
        same = [r for r in self.gt_rows if r.get("arch") == e.get("arch")]
        other = next((r for r in same if r.get("seed") != e.get("seed")), None)
        ok = other and _is_num(e.get("acc")) and _is_num(other.get("acc"))
        row = {**e, "seed_diff": e["acc"] - other["acc"] if ok else None}
        again = next((r for r in same if r.get("seed") == e.get("seed")), None)
        if again is None:
            self.gt_rows.append(row)
        else:
            self.gt_rows[self.gt_rows.index(again)] = row

    def _plan(self, e: dict) -> None:
        phases = e.get("phases")
        self.plan = [p for p in phases if isinstance(p, dict)] if isinstance(phases, list) else []

    def _results(self, e: dict) -> None:
        self.results = e

    def _pool(self, e: dict) -> None:
        self.pool = e
        if _finite(e.get("mean_dist")):
            self.pool_means.append(e["mean_dist"])

    def _rank(self, e: dict) -> None:
        self.rank = e
        if isinstance(e.get("points"), list):
            self.points = _pairs(e["points"])
        if _finite(e.get("kendall")) or _finite(e.get("pearson")):
            self.rank_events.append(e)

    def _noise_ceiling(self, e: dict) -> None:
        self.ceiling = e

    def _stage_end(self, e: dict) -> None:
        if _finite(e.get("seconds")):
            self.stage_seconds[str(e.get("stage"))] = e["seconds"]

    def _end(self, e: dict) -> None:
        self.end = e

    def _nothing(self, e: dict) -> None:
        """Events that only make a log line (events.describe)."""

    HANDLERS = {
        "run_start": _run_start, "stage_start": _stage_start, "phase_start": _phase_start,
        "progress": _progress, "groundtruth": _groundtruth, "evaluate": _activity,
        "groundtruth_step": _activity, "search": _search, "plan": _plan, "results": _results,
        "pool": _pool, "rank": _rank, "noise_ceiling": _noise_ceiling, "kd_teacher": _nothing,
        "checkpoint": _nothing, "warning": _nothing, "phase_end": _nothing,
        "stage_end": _stage_end, "end": _end,
    }

    def in_ground_truth(self) -> bool:
        return self.activity.get("event") in GROUND_TRUTH_EVENTS


def step_counts(s: RunState) -> tuple[float, float | None]:
    """(done, total) for the progress bar; total None while nothing is planned yet. While a
    stand-alone net trains, its own steps."""
    if s.activity.get("event") == "groundtruth_step":
        done, total = s.activity.get("step"), s.activity.get("steps")
    elif s.activity:
        done, total = s.activity.get("done"), s.activity.get("total")
    else:
        done = s.progress.get("step")
        total = s.progress.get("steps") or s.phase.get("steps")
    return (done if _finite(done) else 0), (total if _finite(total) and total > 0 else None)


def gt_eta(s: RunState) -> float | None:
    """Seconds until the ground truth is done: nets left at the mean measured time."""
    timed = [r["seconds"] for r in s.gt_rows if _finite(r.get("seconds"))]
    if not s.in_ground_truth() or not timed:
        return None
    done = s.activity.get("done") if _finite(s.activity.get("done")) else 0
    total = s.activity.get("total") if _finite(s.activity.get("total")) else 0
    return max(0, total - done) * sum(timed) / len(timed)


def eta(s: RunState) -> float | None:
    """Seconds left of the ground truth (`gt_eta`) and of training: every phase's remaining
    steps at its measured seconds per step. A phase not begun yet takes the seconds per path
    of its stage's latest measured phase, else of the latest measured phase, times its own
    paths per step (k). None while nothing is measured, and during evaluation and search,
    whose length the log does not plan."""
    if s.end:
        return 0.0
    if s.activity and not s.in_ground_truth():
        return None
    left = gt_eta(s) or 0.0
    current = s.phase.get("index") if _finite(s.phase.get("index")) else 0
    step = s.progress.get("step") if _finite(s.progress.get("step")) else 0
    per_path: dict = {}
    latest = None
    for i, p in enumerate(s.plan, 1):
        k = p.get("k") if _finite(p.get("k")) and p.get("k") > 0 else 1
        measured = s.rates.get(p.get("phase"))
        if measured is not None:
            per_path[p.get("stage")] = latest = measured / k
        if i < current or not _finite(p.get("steps")):
            continue
        rate = per_path.get(p.get("stage"), latest)
        if rate is None:
            return None
        left += (p["steps"] - (step if i == current else 0)) * rate * k
    return left if s.plan or gt_eta(s) is not None else None


def phase_offsets(plan: list[dict]) -> tuple[dict[str, int], int]:
    """Each planned phase's first step counted over the whole run, and the run's steps."""
    offsets, total = {}, 0
    for p in plan:
        offsets[str(p.get("phase"))] = total
        total += p["steps"] if _finite(p.get("steps")) else 0
    return offsets, total


def rank_series(s: RunState) -> list[tuple[float, float | None, float | None]]:
    """(training step over the whole run, Kendall, Pearson) of every rank probe so far; the
    final evaluation at the run's last step. Without a plan, probes are numbered in order."""
    offsets, total = phase_offsets(s.plan)
    series = []
    for i, e in enumerate(s.rank_events):
        if e.get("stage") == "final":
            x = total if total else i
        elif str(e.get("phase")) in offsets and _finite(e.get("step")):
            x = offsets[str(e["phase"])] + e["step"]
        else:
            x = i
        series.append((x, *(e[k] if _finite(e.get(k)) else None for k in ("kendall", "pearson"))))
    return series


def stage_starts(s: RunState) -> list[tuple[int, str]]:
    """(first step over the whole run, stage) of every planned stage: the series' x ticks."""
    offsets, _ = phase_offsets(s.plan)
    starts = {}
    for p in s.plan:
        starts.setdefault(str(p.get("stage")), offsets[str(p.get("phase"))])
    return [(x, stage) for stage, x in starts.items()]


def timeline(s: RunState) -> list[tuple[str, str, float | None]]:
    """(stage, done | running | waiting, seconds if done) along the run."""
    out = []
    if s.gt_rows or s.in_ground_truth():
        out.append(("ground truth", "running" if s.in_ground_truth() else "done", None))
    for stage in dict.fromkeys(str(p.get("stage")) for p in s.plan):
        if stage in s.stage_seconds:
            out.append((stage, "done", s.stage_seconds[stage]))
        else:
            out.append((stage, "running" if stage == s.stage else "waiting", None))
    return out


def phase_text(s: RunState) -> str:
    if s.activity:
        return activity_text(s.activity)
    p, q = s.phase, s.progress
    of = f" ({p.get('index')}/{p['of']})" if p.get("of") else ""
    sub = f"  sub-supernet {p['sub']}" if p.get("sub") is not None else ""
    lines = [f"stage {s.stage or '-'}  phase {s.phase_name or '-'}{of}",
             f"k {p.get('k', '-')}{sub}" if p else "",
             *format_space(p.get("space")),
             f"step {q.get('step', 0)}/{q.get('steps') or p.get('steps', '-')}  "
             f"epoch {_num(q.get('epoch'), '.2f')}",
             f"loss {_num(q.get('loss'), '.4f')}  lr {_num(q.get('lr', p.get('lr')), '.2e')}",
             f"{_num(q.get('ips'), '.0f')} img/s"]
    if "queue_fill" in q or "ema_momentum" in q:  # Pi-NAS stages only
        lines.append(f"queue {_num(q.get('queue_fill'), '.0%')}  "
                     f"ema {_num(q.get('ema_momentum'), '.4f')}")
    return "\n".join(line for line in lines if line)


def activity_text(a: dict) -> str:
    if a.get("event") == "groundtruth_step":
        arch = str(a.get("arch", ""))
        return "\n".join([f"ground truth  {a.get('done')}/{a.get('total')} done",
                          f"training {arch[:24]}{'…' if len(arch) > 24 else ''}",
                          f"seed {a.get('seed')}  step {a.get('step')}/{a.get('steps')}"])
    lines = [f"{a.get('event')}  {a.get('done')}/{a.get('total')}"]
    if a.get("event") == "groundtruth":
        arch = str(a.get("arch", ""))
        lines += [f"last {arch[:24]}{'…' if len(arch) > 24 else ''}",
                  f"acc {_num(a.get('acc'), '.4f')}  seed {a.get('seed')}"]
    if a.get("event") == "search":  # done/total count generations
        best = str(a.get("best", ""))
        lines += [f"best {best[:24]}{'…' if len(best) > 24 else ''}",
                  f"top-1 {_num(a.get('top1'), '.4f')}  {a.get('evaluated')} archs evaluated"]
    return "\n".join(lines)


def pool_text(pool: dict) -> str:
    if not pool:
        return "no constraint pool yet"
    return (f"size {pool.get('size')}  mean {_num(pool.get('mean_dist'), '.1f')}"
            f"  min {_num(pool.get('min_dist'), '.1f')}\n"
            f"novelty {_num(pool.get('novelty'), '.1f')}  "
            f"({pool.get('stage')} step {pool.get('step')})")


def pool_rows(pool: dict) -> list[tuple[str, str, str]]:
    """The pool's members as a reader scans them: (#, depths per stage, mean width % per
    stage); a log without those fields (an older version's) shows the codes instead."""
    archs = pool.get("archs") if isinstance(pool.get("archs"), list) else []
    depths, widths = pool.get("depths"), pool.get("widths")
    if not (isinstance(depths, list) and isinstance(widths, list)
            and len(depths) == len(widths) == len(archs)):
        return [(str(i), str(a), "") for i, a in enumerate(archs, 1)]
    def spaced(values):
        return " ".join(str(v) for v in values) if isinstance(values, list) else "-"
    return [(str(i), spaced(d), spaced(w)) for i, (d, w) in enumerate(zip(depths, widths), 1)]


def rank_text(rank: dict, ceiling: dict) -> str:
    """The latest Kendall τ, Pearson P and Spearman ρ, and the noise ceiling, in two lines to
    leave the scatter below (supernet (x) against truth (y)) as much room as they can."""
    lines = [f"τ {_num(rank.get('kendall'), '.3f')}  P {_num(rank.get('pearson'), '.3f')}  "
             f"ρ {_num(rank.get('spearman'), '.3f')}  n {rank.get('n', '-')}"]
    if ceiling:
        lines.append(f"ceiling τ {_num(ceiling.get('kendall'), '.2f')}  "
                     f"P {_num(ceiling.get('pearson'), '.2f')}  "
                     f"ρ {_num(ceiling.get('spearman'), '.2f')}")
    return "\n".join(lines)


def timeline_text(s: RunState) -> str:
    """Every stage of the run: done (with its time), running or waiting; and the ETA."""
    marks = {"done": "✓", "running": "▶", "waiting": "·"}
    parts = [f"{marks[status]} {stage}" + (f" {_ago(seconds)}" if seconds is not None else "")
             for stage, status, seconds in timeline(s)]
    left, gt_left = eta(s), gt_eta(s)
    if s.end:
        parts.append("done")
    elif left is not None:
        parts.append(f"ETA {_ago(left)}")
    else:
        parts.append(f"ETA of the ground truth {_ago(gt_left)}" if gt_left is not None
                     else "ETA -")
    return "  ".join(parts)


GT_COLUMNS = ("#", "seed", "top-1", "Δ seeds", "MFLOPs", "s", "arch")


def gt_row(r: dict) -> tuple:
    """A ground-truth table row: done, seed, top-1, difference to the other seed, MFLOPs,
    seconds (blank when it came from the cache), arch."""
    flops = f"{r['flops'] / 1e6:.2f}" if _finite(r.get("flops")) else "-"
    return (str(r.get("done")), str(r.get("seed")), _num(r.get("acc"), ".4f"),
            _num(r.get("seed_diff"), "+.4f"), flops, _num(r.get("seconds"), ".0f"),
            str(r.get("arch")))


def final_cells(m: dict, name: str) -> str:
    ci = m.get(f"{name}_ci")
    ci_ok = isinstance(ci, list) and len(ci) == 2
    interval = f" [{_num(ci[0], '.2f')}, {_num(ci[1], '.2f')}]" if ci_ok else ""
    return _num(m.get(name), ".3f") + interval


class RankSeries(PlotextPlot):
    """The running rank correlation: Kendall τ and Pearson at every probe, over the run's
    training steps, with the ceiling's Kendall as a line beside them; `series` holds what is
    drawn."""

    def show(self, series: list, ceiling: float | None, starts: list) -> None:
        self.series = list(series)
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        for k, label in ((1, "τ"), (2, "P")):
            points = [(p[0], p[k]) for p in self.series if p[k] is not None]
            if points:
                plt.plot([x for x, _ in points], [y for _, y in points], label=label,
                         marker="braille")
        if self.series and ceiling is not None:
            plt.hline(ceiling, "gray")
            plt.title(f"ceiling τ {ceiling:.2f} (gray)")
        if starts:
            plt.xticks([x for x, _ in starts], [stage[:7] for _, stage in starts])
        self.refresh()


class RankScatter(PlotextPlot):
    """Supernet top-1 (x) against ground truth (y), one point per arch, or the search's front;
    `points` holds what is drawn."""

    def show(self, points: list, title: str) -> None:
        self.points = [tuple(p) for p in points]
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        if self.points:
            plt.scatter([p[0] for p in self.points], [p[1] for p in self.points], marker="dot")
        if title:
            plt.title(title)
        self.refresh()


class TrainerControl:
    """The training subprocess a UI owns: `q` once asks, `q` again within CONFIRM_SECONDS sends
    SIGINT (the trainer saves a checkpoint and writes an `end` event), and the UI waits for it
    to exit. None of this applies to a UI that only watches a run (`process` None)."""

    def __init__(self, process: subprocess.Popen | None):
        self.process = process
        self.confirm_until = 0.0
        self.stopping = False

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def press_q(self) -> str:
        """What a press of q does: 'quit' (nothing to stop), 'confirm' (ask once more), 'stop'
        (SIGINT sent) or 'wait' (already stopping)."""
        if not self.running():
            return "quit"
        if self.stopping:
            return "wait"
        if time.monotonic() < self.confirm_until:
            self.stopping = True
            self.process.send_signal(signal.SIGINT)
            return "stop"
        self.confirm_until = time.monotonic() + CONFIRM_SECONDS
        return "confirm"

    def stopped(self) -> bool:
        """Whether a stop was asked for and the trainer has exited since."""
        return self.stopping and not self.running()

    def status(self, word: str, ended: bool) -> str:
        """The status line's word for the trainer's side of things; `word` is the log's."""
        p = self.process
        if self.stopping:
            return "stopping: waiting for the checkpoint and the trainer to exit"
        if p.poll() is not None:
            return (f"training {word}" if ended
                    else f"training exited with code {p.returncode}") + ": press q to quit"
        if time.monotonic() < self.confirm_until:
            return CONFIRM_TEXT
        return word


class NasApp(App):
    CSS = """
    #status { height: 1; padding: 0 1; background: $primary; color: $text;
              text-wrap: nowrap; text-overflow: ellipsis; }
    #timeline { height: 2; padding: 0 1; color: $text-muted; }
    .row-top { height: 11; }
    .row-bottom { height: 1fr; }
    .panel { border: round $primary; border-title-color: $accent; padding: 0 1; }
    #phase-panel { width: 36; }
    #rank-panel { width: 44; }
    #progress Bar { width: 1fr; }
    #pool-spark, #rank-spark, #final-pool-spark { height: 1; }
    #pool-members, #gt-table, #final-table { height: 1fr; }
    #rank-series, #scatter { height: 1fr; min-height: 4; }
    """
    BINDINGS = [("q", "quit_or_stop", "quit")]
    ENABLE_COMMAND_PALETTE = False

    def __init__(self, run_dir: Path, process: subprocess.Popen | None = None):
        super().__init__()
        self.run_dir = Path(run_dir)
        self.trainer = TrainerControl(process)
        self.tail = EventTail(self.run_dir / "events.jsonl")
        self.state = RunState(self.run_dir.name)
        self.drawn: dict = {}  # what each table and the scatter show now, to redraw on change

    def compose(self) -> ComposeResult:
        yield Static(id="status", markup=False)
        yield Static(id="timeline", markup=False)
        with Horizontal(classes="row-top"):
            with Vertical(id="phase-panel", classes="panel"):
                yield Static(id="phase", markup=False)
                yield ProgressBar(id="progress", show_eta=False)
            with Vertical(id="pool-panel", classes="panel"):
                yield Static(id="pool", markup=False)
                yield Sparkline([], id="pool-spark")
                yield DataTable(id="pool-members", show_cursor=False)
            with Vertical(id="gt-panel", classes="panel"):
                yield DataTable(id="gt-table", show_cursor=False)
            with Vertical(id="final-panel", classes="panel"):
                yield Static(id="final-path", markup=False)
                yield Static(id="final-pool", markup=False)  # the pool's series stays in view
                yield Sparkline([], id="final-pool-spark")
                yield DataTable(id="final-table", show_cursor=False)
        with Horizontal(classes="row-bottom"):
            with Vertical(id="rank-panel", classes="panel"):
                yield Static(id="rank", markup=False)
                yield Sparkline([], id="rank-spark")
                yield RankSeries(id="rank-series")
                yield RankScatter(id="scatter")
            with Vertical(id="log-panel", classes="panel"):
                yield Log(id="log", max_lines=5000)
        yield Footer()

    def on_mount(self) -> None:
        titles = {"phase-panel": "phase", "pool-panel": "constraint pool", "rank-panel": "rank",
                  "log-panel": "log", "gt-panel": "ground truth", "final-panel": "results"}
        for panel_id, title in titles.items():
            self.query_one(f"#{panel_id}").border_title = title
        self.query_one("#pool-members", DataTable).add_columns("#", "depths", "width %")
        self.query_one("#gt-table", DataTable).add_columns(*GT_COLUMNS)
        self.query_one("#final-table", DataTable).add_columns("", "kendall", "pearson",
                                                              "spearman", "n")
        self.fit_to(self.size.height)
        self.poll_log()
        self.set_interval(POLL_SECONDS, self._tick)

    def on_resize(self, event) -> None:
        self.fit_to(event.size.height)

    def fit_to(self, rows: int) -> None:
        """Plots where there is room; in a short terminal (80 x 24) the latest values and a
        sparkline each: the rank series and the pool's members give way."""
        compact = rows < COMPACT_BELOW
        for selector in ("#rank-series", "#scatter", "#pool-members"):
            self.query_one(selector).display = not compact
        self.query_one("#rank-spark").display = compact

    def _tick(self) -> None:
        self.poll_log()
        if self.trainer.stopped():
            self.exit()

    def poll_log(self) -> None:
        """Fold what the trainer appended since the last poll into the state, log a line for
        each event that is one (events.describe), and redraw."""
        lines = []
        for event in self.tail.read():
            self.state.apply(event)
            line = describe(event)
            if line:
                lines.append(f"{_clock(event.get('time'))} {line}")
        if lines:
            self.query_one("#log", Log).write_lines(lines)
        self._refresh_view()

    def _changed(self, what: str, value) -> bool:
        """Whether `what` shows something else than `value` now; remembers `value`."""
        if self.drawn.get(what) == value:
            return False
        self.drawn[what] = value
        return True

    def _refresh_view(self) -> None:
        s = self.state
        self.query_one("#status", Static).update(self._status_text())
        self.query_one("#phase", Static).update(phase_text(s))
        done, total = step_counts(s)
        self.query_one("#progress", ProgressBar).update(total=total, progress=done)
        self.query_one("#pool", Static).update(pool_text(s.pool))
        self.query_one("#pool-spark", Sparkline).data = list(s.pool_means)
        self.query_one("#final-pool", Static).update(
            f"pool  {pool_text(s.pool).splitlines()[0]}" if s.pool else "")
        self.query_one("#final-pool-spark", Sparkline).data = list(s.pool_means)
        self.query_one("#rank", Static).update(rank_text(s.rank, s.ceiling))
        series = rank_series(s)
        self.query_one("#rank-spark", Sparkline).data = [k for _, k, _ in series
                                                         if k is not None]
        ceiling = s.ceiling.get("kendall") if _finite(s.ceiling.get("kendall")) else None
        if self._changed("series", (series, ceiling)):
            self.query_one("#rank-series", RankSeries).show(series, ceiling, stage_starts(s))
        self.query_one("#timeline", Static).update(timeline_text(s))
        searching = s.activity.get("event") == "search" and not s.results
        points = s.front if searching else s.points  # the run's own once the results are in
        if self._changed("scatter", (searching, points)):
            title = "search front: GFLOPs (x), top-1 (y)" if searching else ""
            self.query_one("#scatter", RankScatter).show(points, title)
        if self._changed("gt", [gt_row(r) for r in s.gt_rows]):
            table = self.query_one("#gt-table", DataTable)
            table.clear()
            table.add_rows(self.drawn["gt"])
            table.move_cursor(row=len(s.gt_rows) - 1)  # the newest net in view
        self._show_big_panel()
        if self._changed("pool", pool_rows(s.pool)):
            table = self.query_one("#pool-members", DataTable)
            table.clear()
            table.add_rows(self.drawn["pool"])

    def _show_big_panel(self) -> None:
        """The results once there are some, the ground truth while it trains, else the pool."""
        s = self.state
        shown = "final" if s.results else "gt" if s.in_ground_truth() else "pool"
        for name in ("final", "gt", "pool"):
            self.query_one(f"#{name}-panel").display = name == shown
        if s.results and not self.query_one("#final-table", DataTable).row_count:
            self._fill_final_table(s.results)

    def _fill_final_table(self, results: dict) -> None:
        self.query_one("#final-path", Static).update(f"report: {results.get('report')}")
        rows = results.get("rows") if isinstance(results.get("rows"), dict) else {}
        table = self.query_one("#final-table", DataTable)
        for label, m in rows.items():
            if isinstance(m, dict) and "note" in m:  # e.g. a correction that is not estimable
                table.add_row(label, str(m["note"]), "", "", "")
            elif isinstance(m, dict):
                table.add_row(label, *(final_cells(m, k) for k in ("kendall", "pearson",
                                                                   "spearman")), str(m.get("n")))

    def _status_text(self) -> str:
        s = self.state
        where = " │ ".join(str(x) for x in (s.name, s.stage, s.phase_name) if x)
        return f"{where} │ {self._status_word()}"

    def _status_word(self) -> str:
        s = self.state
        status = str(s.end.get("status")) if s.end else "running"
        word = (END_WORDS.get(status, status) if s.last_time is not None
                else "waiting for events.jsonl")
        if self.trainer.process is None:
            quiet = time.time() - (s.last_time or time.time())
            word += f", last event {_ago(quiet)} ago" if not s.end and quiet > QUIET_SECONDS else ""
        else:
            word = self.trainer.status(word, s.end is not None)
        if self.tail.bad_lines:  # harmless (e.g. a line cut by a crash), but worth a count
            word += f" ({self.tail.bad_lines} unreadable lines skipped)"
        return word

    def action_quit_or_stop(self) -> None:
        answer = self.trainer.press_q()
        if answer == "quit":
            self.exit()
        elif answer == "wait":
            self.notify("still waiting for the trainer to save and exit (ctrl+q leaves it running)")
        elif answer == "confirm":
            self.notify(CONFIRM_TEXT)
        self.query_one("#status", Static).update(self._status_text())


def run_tui(run_dir: Path, process: subprocess.Popen | None = None) -> None:
    """Show the run in `run_dir` until the user quits; with `process`, own that training run.
    On leaving a run that goes on, say so and how to watch it again."""
    app = NasApp(run_dir, process)
    app.run()
    owned_running = process is not None and process.poll() is None  # left with ctrl+q
    if owned_running or (process is None and app.state.end is None):
        pid = f" (pid {process.pid})" if owned_running else ""
        print(f"training continues in the background{pid}; watch it with "
              f"`python nas.py tui --name {Path(run_dir).name}`")
