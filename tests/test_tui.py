"""The TUI against a recorded event log: what the widgets show must match the log."""

import asyncio
import json
import subprocess
import sys

from textual.widgets import DataTable, Log, ProgressBar, Sparkline, Static

import tui
from conftest import ROOT
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
     "spearman": 0.62, "n": 3, "points": [[0.5, 0.8], [0.55, 0.82], [0.6, 0.81]]},
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
    {"event": "search", "done": 2, "total": 4, "best": ARCH_C, "top1": 0.8123, "evaluated": 30,
     "front": [[2.6, 0.70], [4.1, 0.81]]},
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
        assert "τ 0.457  P 0.610" in text(app, "#rank")
        assert "ceiling τ 0.80  P 0.90" in text(app, "#rank")
        assert app.query_one("#scatter", tui.RankScatter).points == [(0.5, 0.8), (0.55, 0.82),
                                                                      (0.6, 0.81)]
        log = "\n".join(app.query_one("#log", Log).lines)
        assert "loss is noisy at lr 0.01" in log and "checkpoint cpt/1 step 40" in log
        assert "running" in text(app, "#status") and "tiny-demo" in text(app, "#status")

        append(log_file, lines(AFTER, start=len(TRAINING)))
        app.poll_log()
        await pilot.pause()
        assert "search  2/4" in text(app, "#phase") and "top-1 0.8123" in text(app, "#phase")
        assert "30 archs evaluated" in text(app, "#phase")
        assert app.query_one("#scatter", tui.RankScatter).points == [(2.6, 0.70), (4.1, 0.81)]
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


GROUND_TRUTH = [
    {"event": "run_start", "run": "gt-demo", "preset": "tiny", "stages": ["warmup"], "seed": 0},
    {"event": "groundtruth", "done": 1, "total": 4, "arch": ARCH_A, "acc": 0.81, "seed": 0,
     "seconds": 40.0, "flops": 5.5e6},
    {"event": "groundtruth", "done": 2, "total": 4, "arch": ARCH_A, "acc": 0.83, "seed": 1,
     "seconds": 44.0, "flops": 5.5e6},
    {"event": "groundtruth", "done": 3, "total": 4, "arch": ARCH_B, "acc": 0.79, "seed": 0,
     "seconds": None, "flops": 2.25e6},
    {"event": "groundtruth_step", "arch": ARCH_B, "seed": 1, "step": 30, "steps": 120,
     "done": 3, "total": 4},
]


def test_ground_truth_table_grows_with_the_log_and_shows_the_net_in_training(tmp_path):
    (tmp_path / "events.jsonl").write_text(lines(GROUND_TRUTH))
    app = NasApp(tmp_path)

    async def script(pilot):
        await pilot.pause()
        table = app.query_one("#gt-table", DataTable)
        assert app.query_one("#gt-panel").display and not app.query_one("#pool-panel").display
        rows = [tuple(table.get_row_at(i)) for i in range(table.row_count)]
        finished = [e for e in GROUND_TRUTH if e["event"] == "groundtruth"]
        assert [(r[1], r[2], r[6]) for r in rows] == [
            (str(e["seed"]), f"{e['acc']:.4f}", e["arch"]) for e in finished]
        assert rows == [("1", "0", "0.8100", "-", "5.50", "40", ARCH_A),
                        ("2", "1", "0.8300", "+0.0200", "5.50", "44", ARCH_A),
                        ("3", "0", "0.7900", "-", "2.25", "-", ARCH_B)]
        assert "seed 1  step 30/120" in text(app, "#phase")
        bar = app.query_one("#progress", ProgressBar)
        assert (bar.progress, bar.total) == (30, 120)
        log = app.query_one("#log", Log).lines
        assert sum("ground truth" in line for line in log) == 3
        # one net of 4 left at the mean of the timed ones (42 s)
        assert tui.eta(app.state) == 42.0 and "ETA 42 s" in text(app, "#timeline")
        # a resumed `all` logs its ground truth again: no row twice
        append(tmp_path / "events.jsonl", lines(GROUND_TRUTH, start=10))
        app.poll_log()
        await pilot.pause()
        assert table.row_count == 3

    drive(app, script)


def test_eta_from_measured_rates_and_planned_steps(tmp_path):
    plan = [{"stage": "warmup", "phase": "warmup", "k": 1, "steps": 100},
            {"stage": "aps_depth", "phase": "aps_depth/1", "k": 4, "steps": 50},
            {"stage": "aps_depth", "phase": "aps_depth/2", "k": 4, "steps": 80},
            {"stage": "cpt", "phase": "cpt", "k": 1, "steps": 40}]
    events = [{"event": "plan", "phases": plan},
              {"event": "stage_start", "stage": "warmup"},
              {"event": "phase_start", "stage": "warmup", "phase": "warmup", "index": 1, "of": 4,
               "steps": 100, "resumed_at": 0},
              {"event": "progress", "stage": "warmup", "phase": "warmup", "step": 100,
               "steps": 100},
              {"event": "stage_end", "stage": "warmup", "seconds": 100.0},
              {"event": "stage_start", "stage": "aps_depth"},
              {"event": "phase_start", "stage": "aps_depth", "phase": "aps_depth/1", "index": 2,
               "of": 4, "steps": 50, "resumed_at": 0},
              {"event": "progress", "stage": "aps_depth", "phase": "aps_depth/1", "step": 10,
               "steps": 50}]
    # times: warmup 1 s/step; aps_depth/1 started at 200 and took 30 s for its first 10 steps
    times = [0, 0, 100, 200, 200, 200, 200, 230]
    (tmp_path / "events.jsonl").write_text("".join(
        json.dumps({"time": T0 + t, **e}) + "\n" for t, e in zip(times, events)))
    state = tui.RunState("eta")
    for e in tui.EventTail(tmp_path / "events.jsonl").read():
        state.apply(e)
    # aps_depth/1: 40 steps left at 3 s; aps_depth/2: 80 at its stage's 3 s (the same k);
    # cpt, one path a step: 40 at the latest measured seconds per path, 3 s / 4 paths
    assert tui.eta(state) == 40 * 3 + 80 * 3 + 40 * 3 / 4
    assert [(s, status) for s, status, _ in tui.timeline(state)] == [
        ("warmup", "done"), ("aps_depth", "running"), ("cpt", "waiting")]


def test_the_final_table_shows_the_results_and_the_report(tmp_path):
    results = {"rows": {"supernet": {"pearson": 0.5, "kendall": 0.41, "spearman": 0.52, "n": 40,
                                     "kendall_ci": [0.2, 0.6]},
                        "FLOPs": {"pearson": 0.1, "kendall": 0.05, "spearman": 0.08, "n": 40}}}
    events = TRAINING + [{"event": "results", "report": "runs/x/report.md", **results},
                         {"event": "end", "status": "done", "message": "report: runs/x/report.md"}]
    (tmp_path / "events.jsonl").write_text(lines(events))
    app = NasApp(tmp_path)

    async def script(pilot):
        await pilot.pause()
        assert app.query_one("#final-panel").display
        table = app.query_one("#final-table", DataTable)
        assert table.get_row_at(0) == ["supernet", "0.410 [0.20, 0.60]", "0.500", "0.520", "40"]
        assert table.get_row_at(1)[0] == "FLOPs" and table.get_row_at(1)[1] == "0.050"
        # the scatter is the run's own again: the last rank event's points
        assert app.query_one("#scatter", tui.RankScatter).points == [(0.5, 0.8), (0.55, 0.82),
                                                                      (0.6, 0.81)]
        assert "runs/x/report.md" in text(app, "#final-path")
        assert "done" in text(app, "#timeline")

    drive(app, script)


def test_every_event_a_real_run_writes_is_in_the_vocabulary_with_its_fields(dry_run):
    import events as vocabulary
    logged = [json.loads(line) for line in
              (dry_run.run / "events.jsonl").read_text().splitlines()]
    assert {e["event"] for e in logged} >= {"run_start", "plan", "groundtruth", "noise_ceiling",
                                           "phase_start", "progress", "pool", "rank",
                                           "checkpoint", "phase_end", "stage_end", "evaluate",
                                           "search", "results", "end"}
    for e in logged:
        assert e["event"] in vocabulary.EVENTS, e["event"]
        missing = set(vocabulary.fields(e["event"])) - e.keys()
        assert not missing, (e["event"], missing)


def test_the_ui_shows_what_a_real_run_wrote(dry_run):
    logged = [json.loads(line) for line in
              (dry_run.run / "events.jsonl").read_text().splitlines()]
    ranks = [e for e in logged if e["event"] == "rank"]
    pool = [e for e in logged if e["event"] == "pool"][-1]
    results = [e for e in logged if e["event"] == "results"][-1]
    stages = list(dict.fromkeys(p["stage"] for p in
                                [e for e in logged if e["event"] == "plan"][-1]["phases"]))
    for size in ((80, 24), (120, 40)):
        app = NasApp(dry_run.run)

        async def script(pilot):
            await pilot.pause()
            timeline = tui.timeline(app.state)
            assert [(stage, status) for stage, status, _ in timeline] == (
                [("ground truth", "done")] + [(stage, "done") for stage in stages])
            assert all(seconds is not None for _, _, seconds in timeline[1:])
            # the rank series: one point per probe and the final evaluation, as a line where
            # there is room and as a sparkline in 80 x 24
            series = tui.rank_series(app.state)
            assert [k for _, k, _ in series] == [e["kendall"] for e in ranks]
            assert [x for x, _, _ in series] == sorted(x for x, _, _ in series)
            compact = size[1] < tui.COMPACT_BELOW
            assert app.query_one("#rank-spark").display == compact
            assert app.query_one("#rank-series").display != compact
            if compact:
                assert app.query_one("#rank-spark", Sparkline).data == [e["kendall"]
                                                                       for e in ranks]
            else:
                assert len(app.query_one("#rank-series", tui.RankSeries).series) == len(ranks)
                members = app.query_one("#pool-members", DataTable)
                assert [tuple(members.get_row_at(i)) for i in range(members.row_count)] == [
                    (str(i), " ".join(map(str, d)), " ".join(map(str, w)))
                    for i, (d, w) in enumerate(zip(pool["depths"], pool["widths"]), 1)]
            # the pool's series stays on the screen beside the final table
            assert app.query_one("#final-panel").display
            assert f"size {pool['size']}" in text(app, "#final-pool")
            assert app.query_one("#final-pool-spark", Sparkline).data == [
                e["mean_dist"] for e in logged if e["event"] == "pool"]
            table = app.query_one("#final-table", DataTable)
            assert [table.get_row_at(i)[0] for i in range(table.row_count)] == list(
                results["rows"])
            assert "finished" in text(app, "#status")

        async def main():
            async with app.run_test(size=size) as pilot:
                await script(pilot)
        asyncio.run(main())


def test_all_with_the_ui_stops_on_q_twice_and_resumes_to_the_end(tmp_path, monkeypatch,
                                                                   micro_data):
    """`nas.py all --tui`: the trainer runs as a subprocess writing console.log, the UI owns
    it; q twice stops it with a checkpoint, and --resume finishes the run."""
    import nas
    from typer.testing import CliRunner
    monkeypatch.chdir(tmp_path)
    args = ["all", "--preset", "smoke", "--name", "e2e", "--device", "cpu", "--method", "spos"]
    monkeypatch.setattr(sys, "argv", ["nas.py", *args, "--tui"])
    seen = {}

    def drive_ui(run_dir, process):
        app = NasApp(run_dir, process)

        async def main():
            async with app.run_test(size=(100, 30)) as pilot:
                for _ in range(600):  # until training has begun
                    if app.state.phase:
                        break
                    await pilot.pause(0.1)
                seen["phase"] = app.state.phase_name
                await pilot.press("q")
                await pilot.press("q")
                for _ in range(600):
                    if app.return_code is not None:
                        break
                    await pilot.pause(0.1)
        asyncio.run(main())
        seen["code"] = process.wait(timeout=60)
    monkeypatch.setattr(tui, "run_tui", drive_ui)
    result = CliRunner().invoke(nas.app, args + ["--tui"])
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "e2e"
    assert seen["phase"] and seen["code"] == 130  # stopped in training, on purpose
    assert (run / "checkpoints" / "last.pt").exists()
    assert "continue with --resume" in (run / "console.log").read_text()
    ends = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()
            if '"event": "end"' in line]
    assert ends[-1]["status"] == "interrupted"
    done = subprocess.run([sys.executable, str(ROOT / "nas.py"), *args, "--resume"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (run / "report.md").exists()
    assert json.loads((run / "events.jsonl").read_text().splitlines()[-1])["status"] == "done"
