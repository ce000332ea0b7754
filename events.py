"""The event log, `events.jsonl`: the one contract between a run and whatever watches it.

Training, the ground truth, evaluation and search write one JSON object per line, each with
`time` and `event`; the terminal (nas.py), the ablation bench and the UI (tui.py) read them.
`describe` is the one place that turns an event into a line of text, so the three say the
same thing in the same words.

The log may come from another version: a field may be missing or odd, an event unknown, so
`describe` reads every field with `.get` and formats it defensively. This module imports
nothing of the project's.
"""

import json
import math
import time
from pathlib import Path

# Every event the program writes, with the fields it carries besides `time` and `event`.
EVENTS = {
    "run_start": "run, preset, stages, seed, resumed, world_size",
    "plan": "phases: [{stage, phase, k, steps}]",
    "stage_start": "stage",
    "phase_start": "stage, phase, index, of, steps, lr, k, space, sub, resumed_at",
    "progress": "stage, phase, step, steps, loss, lr, ips, epoch (Π-NAS: queue_fill, "
                "ema_momentum)",
    "pool": "stage, step, size, mean_dist, min_dist, novelty, archs, depths, widths (each "
            "member's depths and per-stage mean width in %)",
    "rank": "stage, step, pearson, kendall, spearman, n, points (phase: but in the final one)",
    "checkpoint": "path, stage, phase, step",
    "phase_end": "stage, phase, loss, seconds",
    "stage_end": "stage, seconds",
    "kd_teacher": "chosen (warmup_top1, largest_subnet_top1: where the two were compared)",
    "warning": "message",
    "groundtruth_step": "arch, seed, step, steps, done, total",
    "groundtruth": "done, total, arch, acc, seed, seconds, flops",
    "noise_ceiling": "pearson, kendall, spearman, n, seed_vs_seed",
    "evaluate": "done, total",
    "search": "done, total, best, top1, evaluated, front",
    "results": "report, rows",
    "end": "status, message",
}


def fields(event: str) -> list[str]:
    """The fields every `event` carries (besides time and event): EVENTS' names outside
    parentheses, each up to its colon."""
    text, depth, kept = EVENTS[event], 0, ""
    for ch in text:
        depth += ch in "([{"
        if not depth:
            kept += ch
        depth -= ch in ")]}"
    return [f.split(":")[0].strip() for f in kept.split(",") if f.strip()]


class EventLog:
    """`events.jsonl`: one JSON object per line, flushed at once. `path` None: nothing is
    written (processes other than rank 0, tests), and the record is still returned."""

    def __init__(self, path: Path | None):
        self.file = open(path, "a", encoding="utf-8") if path else None

    def __call__(self, event: str, **fields) -> dict:
        record = {"time": time.time(), "event": event, **fields}
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        return record


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def finite(value) -> bool:
    """Fit for arithmetic, a chart or a progress bar (JSON can carry NaN and Infinity)."""
    return is_number(value) and math.isfinite(value)


def num(value, spec: str) -> str:
    """A number formatted with `spec`, or '-' when the field is missing or not a number."""
    return format(value, spec) if is_number(value) else "-"


def clock(t) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t)) if finite(t) else "--:--:--"


def _metrics(e: dict) -> str:
    return (f"pearson {num(e.get('pearson'), '.3f')}  kendall {num(e.get('kendall'), '.3f')}  "
            f"spearman {num(e.get('spearman'), '.3f')}  (n = {e.get('n')})")


def _groundtruth(e: dict) -> str:
    seconds = e.get("seconds")
    took = f"{num(seconds, '.0f')} s" if seconds is not None else "stored"
    return (f"ground truth {e.get('done')}/{e.get('total')}: seed {e.get('seed')} "
            f"top-1 {num(e.get('acc'), '.4f')} ({took})")


def _noise_ceiling(e: dict) -> str:
    seeds = e.get("seed_vs_seed") if isinstance(e.get("seed_vs_seed"), dict) else {}
    return (f"noise ceiling: kendall {num(e.get('kendall'), '.3f')}; seed vs seed "
            f"{num(seeds.get('kendall'), '.3f')} (n {e.get('n')})")


def _end(e: dict) -> str:
    return f"end: {e.get('status')}" + (f": {e['message']}" if e.get("message") else "")


_LINES = {
    "run_start": lambda e: f"run {e.get('run')} started (preset {e.get('preset')}, "
                           f"seed {e.get('seed')})",
    "stage_start": lambda e: f"stage {e.get('stage')} started",
    "phase_start": lambda e: f"phase {e.get('phase')} started: {e.get('steps')} steps, "
                             f"lr {e.get('lr')}",
    "phase_end": lambda e: f"phase {e.get('phase')} done: loss {num(e.get('loss'), '.4f')}, "
                           f"{num(e.get('seconds'), '.1f')} s",
    "stage_end": lambda e: f"stage {e.get('stage')} done in {num(e.get('seconds'), '.1f')} s",
    "rank": lambda e: f"rank at {e.get('phase') or e.get('stage')}: {_metrics(e)}",
    "checkpoint": lambda e: f"checkpoint {e.get('phase') or e.get('stage')} step "
                            f"{e.get('step')}: {e.get('path')}",
    "kd_teacher": lambda e: f"SSE teacher: warm-up {num(e.get('warmup_top1'), '.4f')}, largest "
                            f"subnet {num(e.get('largest_subnet_top1'), '.4f')}: "
                            f"the {e.get('chosen')}",
    "warning": lambda e: f"warning: {e.get('message')}",
    "groundtruth": _groundtruth,
    "noise_ceiling": _noise_ceiling,
    "search": lambda e: f"search generation {e.get('done')}/{e.get('total')}: best "
                        f"{num(e.get('top1'), '.4f')}, {e.get('evaluated')} archs evaluated",
    "results": lambda e: f"report: {e.get('report')}",
    "end": _end,
}


def describe(event: dict) -> str | None:
    """The event as one line of text, or None for those that are not lines (progress, the
    pool, a ground-truth step, evaluation progress: bars and panels show them) and for events
    this version does not know."""
    line = _LINES.get(str(event.get("event")))
    if line is None:
        return None
    try:
        return line(event)
    except (TypeError, ValueError, AttributeError, OverflowError):  # odd fields
        return f"{event.get('event')} (unreadable fields)"
