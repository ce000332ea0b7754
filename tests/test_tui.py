"""The TUI against a recorded event log: what the widgets show must match the log."""

import asyncio
import json
import subprocess
import sys

from textual.widgets import DataTable, Log, ProgressBar, Sparkline, Static

import tui
from tui import NasApp

T0 = 1_700_000_000.0
ARCH_A = "1" + "5585" + "1" + "11" * 23
ARCH_B = ("1" + "2232" + "2" + "22" * 2 + "00" * 3 + "33" * 2 + "00" * 3 + "45" * 3 + "00" * 5
          + "67" * 2 + "00" * 3)
ARCH_C = ("1" + "3343" + "3" + "13" * 3 + "00" * 2 + "23" * 3 + "00" * 2 + "55" * 4 + "00" * 4
          + "17" * 3 + "00" * 2)
FULL_SPACE = {"depths": [[2, 5], [2, 5], [2, 8], [2, 5]],
              "widths": [[1, 2, 3], [1, 2, 3], [1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 6, 7]]}

TRAINING = [
    {"event": "run_start", "run": "tiny-demo", "preset": "tiny",
     "stages": ["warmup", "aps_depth", "aps_width", "cpt", "sse34"], "seed": 0},
    {"event": "stage_start", "stage": "aps_depth"},
    {"event": "phase_start", "stage": "aps_depth", "phase": "aps_depth/2", "index": 2, "of": 3,
     "steps": 120, "lr": 0.002, "k": 4,
     "space": {"depths": [[3, 5], [3, 5], [4, 8], [2, 5]], "widths": [[1]] * 4}, "sub": None},
    {"event": "progress", "stage": "aps_depth", "phase": "aps_depth/2", "step": 40, "steps": 120,
     "epoch": 1.3, "loss": 1.234, "lr": 0.0019, "ips": 5123.4},
    {"event": "phase_end", "stage": "aps_depth", "phase": "aps_depth/2", "loss": 1.2,
     "seconds": 12.3},
    {"event": "stage_end", "stage": "aps_depth", "seconds": 30.0},
    {"event": "stage_start", "stage": "cpt"},
    {"event": "phase_start", "stage": "cpt", "phase": "cpt/1", "index": 1, "of": 1, "steps": 100,
     "lr": 0.01, "k": 4, "space": FULL_SPACE, "sub": None},
    {"event": "noise_ceiling", "pearson": 0.9, "kendall": 0.8, "spearman": 0.9, "n": 6},
    {"event": "pool", "stage": "cpt", "step": 20, "size": 2, "mean_dist": 41.0, "min_dist": 41,
     "novelty": 41.0, "archs": [ARCH_A, ARCH_B]},
    {"event": "rank", "stage": "cpt", "step": 20, "pearson": 0.41, "kendall": 0.3, "spearman": 0.42,
     "n": 12},
    {"event": "pool", "stage": "cpt", "step": 40, "size": 3, "mean_dist": 53.2, "min_dist": 12,
     "novelty": 48.1, "archs": [ARCH_A, ARCH_B, ARCH_C]},
    {"event": "rank", "stage": "cpt", "step": 40, "pearson": 0.61, "kendall": 0.4567,
     "spearman": 0.62, "n": 12},
    {"event": "checkpoint", "path": "runs/tiny-demo/checkpoints/last.pt", "stage": "cpt",
     "phase": "cpt/1", "step": 40},
    {"event": "warning", "message": "loss is noisy at lr 0.01"},
    {"event": "phase_end", "stage": "cpt", "phase": "cpt/1", "loss": 1.1, "seconds": 12.3},
    {"event": "stage_end", "stage": "cpt", "seconds": 30.0},
    {"event": "stage_start", "stage": "pinas"},
    {"event": "phase_start", "stage": "pinas", "phase": "pinas/1", "index": 1, "of": 1, "steps": 50,
     "lr": 0.05, "k": 2, "space": FULL_SPACE, "sub": 1},
    {"event": "progress", "stage": "pinas", "phase": "pinas/1", "step": 5, "steps": 50,
     "epoch": 0.2, "loss": 5.1, "lr": 0.05, "ips": 900.0, "queue_fill": 0.25,
     "ema_momentum": 0.999},
]
AFTER = [
    {"event": "groundtruth", "done": 3, "total": 12, "arch": ARCH_B, "acc": 0.81, "seed": 0},
    {"event": "evaluate", "done": 10, "total": 12},
    {"event": "kd_teacher", "warmup_top1": 0.71, "largest_subnet_top1": 0.74,
     "chosen": "largest subnet"},
    {"event": "search", "done": 2, "total": 4, "best": ARCH_C, "top1": 0.8123, "evaluated": 30},
    {"event": "end", "status": "done", "message": "results in runs/tiny-demo/results.json"},
]


def lines(events, start=0):
    return "".join(json.dumps({"time": T0 + start + i, **e}) + "\n" for i, e in enumerate(events))


def append(path, text):
    with path.open("a") as f:
        f.write(text)


def text(app, selector):
    return str(app.query_one(selector, Static).content)


def drive(app, script):
    """Run `script(pilot)` against `app` in an 80x24 headless terminal."""
    async def main():
        async with app.run_test(size=(80, 24)) as pilot:
            await script(pilot)
    asyncio.run(main())


def test_widgets_match_the_log(tmp_path):
    log_file = tmp_path / "events.jsonl"
    log_file.write_text(lines(TRAINING))
    app = NasApp(tmp_path)

    async def script(pilot):
        app.poll_log()
        await pilot.pause()
        phase = text(app, "#phase")
        assert "pinas/1" in phase and "5.1000" in phase
        assert "D [2,5][2,5][2,8][2,5]" in phase and "W 1-3|1-3|1-5|1-7" in phase
        assert "queue 25%" in phase and "ema 0.9990" in phase and "sub-supernet 1" in phase
        bar = app.query_one("#progress", ProgressBar)
        assert (bar.progress, bar.total) == (5, 50)
        assert "size 3" in text(app, "#pool") and "mean 53.2" in text(app, "#pool")
        assert app.query_one("#pool-spark", Sparkline).data == [41.0, 53.2]
        table = app.query_one("#pool-members", DataTable)
        assert list(table.get_column_at(1)) == [ARCH_A, ARCH_B, ARCH_C]
        assert "kendall 0.457" in text(app, "#rank")
        assert "ceiling P 0.90 τ 0.80" in text(app, "#rank")
        kendalls = [e["kendall"] for e in TRAINING if e["event"] == "rank"]
        assert app.query_one("#rank-spark", Sparkline).data == kendalls
        log = "\n".join(app.query_one("#log", Log).lines)
        assert "loss is noisy at lr 0.01" in log and "checkpoint cpt/1 step 40" in log
        assert "running" in text(app, "#status") and "tiny-demo" in text(app, "#status")

        append(log_file, lines(AFTER, start=len(TRAINING)))
        app.poll_log()
        await pilot.pause()
        assert "search  2/4" in text(app, "#phase") and "top-1 0.8123" in text(app, "#phase")
        assert "30 archs evaluated" in text(app, "#phase")
        assert any("the largest subnet" in line for line in app.query_one("#log", Log).lines)
        assert "finished" in text(app, "#status")
        assert "end: done" in app.query_one("#log", Log).lines[-1]

    drive(app, script)


def test_partial_garbage_and_unknown_lines_do_not_crash(tmp_path):
    log_file = tmp_path / "events.jsonl"
    warning = json.dumps({"time": T0, "event": "warning", "message": "completed later"})
    log_file.write_text(lines(TRAINING[:3]) + '{"time":1,"event":"zzz"}\nnot json at all\n[1, 2]\n'
                        + '{"time": 2, "event": "progress", "loss": null, "step": "x", '
                          '"space": 3}\n'
                        + '{"time": 3, "event": "phase_start", "space": {"depths": 7}}\n'
                        + warning[:20])
    app = NasApp(tmp_path)

    async def script(pilot):
        app.poll_log()
        await pilot.pause()
        assert "completed later" not in "\n".join(app.query_one("#log", Log).lines)
        assert "2 unreadable lines skipped" in text(app, "#status")
        append(log_file, warning[20:] + "\n")
        app.poll_log()
        await pilot.pause()
        assert "completed later" in app.query_one("#log", Log).lines[-1]

    drive(app, script)


def test_log_created_after_start_is_picked_up(tmp_path):
    run_dir = tmp_path / "later"
    app = NasApp(run_dir)

    async def script(pilot):
        await pilot.pause()
        assert "waiting for events.jsonl" in text(app, "#status")
        run_dir.mkdir()
        (run_dir / "events.jsonl").write_text(lines(TRAINING[:4]))
        await pilot.pause(2 * tui.POLL_SECONDS + 0.2)  # picked up by the timer, not by hand
        assert "aps_depth/2" in text(app, "#phase")

    drive(app, script)


def test_q_without_process_quits_at_once(tmp_path):
    app = NasApp(tmp_path)

    async def script(pilot):
        await pilot.press("q")
        await pilot.pause()
        assert app.return_code == 0

    drive(app, script)


def test_q_stops_an_owned_process_after_confirmation(tmp_path):
    (tmp_path / "events.jsonl").write_text(lines(TRAINING))
    code = ("import signal,time,sys; signal.signal(signal.SIGINT, lambda *a: sys.exit(0)); "
            "time.sleep(30)")
    process = subprocess.Popen([sys.executable, "-c", code])
    app = NasApp(tmp_path, process)

    async def script(pilot):
        await pilot.press("q")
        await pilot.pause(0.3)
        assert process.poll() is None and app.return_code is None
        assert "press q again" in text(app, "#status")
        await pilot.press("q")
        for _ in range(50):
            if app.return_code is not None:
                break
            await pilot.pause(0.1)
        assert app.return_code == 0

    try:
        drive(app, script)
        assert process.wait(timeout=5) == 0
    finally:
        process.kill()


def test_process_that_ended_by_itself_leaves_the_ui_open(tmp_path):
    (tmp_path / "events.jsonl").write_text(lines(TRAINING + AFTER))
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    app = NasApp(tmp_path, process)

    async def script(pilot):
        await pilot.pause()
        assert "training finished: press q to quit" in text(app, "#status")
        await pilot.press("q")
        await pilot.pause()
        assert app.return_code == 0

    drive(app, script)


def test_run_tui_says_whether_training_goes_on(tmp_path, monkeypatch, capsys):
    log_file = tmp_path / "events.jsonl"
    log_file.write_text(lines(TRAINING))
    # stands in for the interactive session: read the log once, then "quit"
    monkeypatch.setattr(NasApp, "run", lambda self: [self.state.apply(e) for e in self.tail.read()])
    tui.run_tui(tmp_path)
    said = capsys.readouterr().out
    assert "training continues in the background" in said
    assert f"nas.py tui --name {tmp_path.name}" in said
    append(log_file, lines(AFTER))
    tui.run_tui(tmp_path)
    assert capsys.readouterr().out == ""
