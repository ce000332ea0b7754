import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

import presets
import supernet
import trainer
from conftest import MICRO, ROOT

sys.path.insert(0, str(ROOT / "bench"))
import ablation  # noqa: E402
import ablation_compare  # noqa: E402
import picks  # noqa: E402

# One or two steps a phase: enough to tell a chained variant from a retrained one.
QUICK = replace(MICRO, name="quick", epoch_scale=0.004, warmup_epochs=0.0625, gt_epochs=0.0625)


def run_ablation(tmp_path, variants):
    ablation.main(preset="quick", variants=variants, gt_n=3, seed=0, device="cpu", data_dir=None,
                  runs=tmp_path / "runs", out=tmp_path / "results")
    return json.loads((tmp_path / "results" / "ablation-quick-cpu.json").read_text())


def test_ablation_chains_variants_and_never_trains_twice(tmp_path, monkeypatch, micro_data):
    monkeypatch.setitem(presets.PRESETS, "quick", QUICK)
    first = run_ablation(tmp_path, "APS_v3,APS_v3+CPT")
    rows = {r["variant"]: r for r in first["rows"]}
    assert list(rows) == ["FLOPs", "params", "APS_v3", "APS_v3+CPT"]
    assert all(r["metrics"]["n"] == 3 for r in rows.values())
    assert rows["APS_v3+CPT"]["stages"] == ["warmup", "aps_depth", "aps_width", "cpt"]
    # +CPT went on from APS_v3's checkpoint: its time includes APS_v3's whole chain
    assert rows["APS_v3+CPT"]["seconds"] > rows["APS_v3"]["seconds"]
    checkpoints = {p.name for p in
                   (tmp_path / "runs" / "ablation-quick" / "checkpoints").glob("*.pt")}
    assert checkpoints == {"warm-up.pt", "APS_v3.pt", "APS_v3+CPT.pt"}

    def no_training(*args, **kwargs):
        raise AssertionError("a finished variant was trained again")
    monkeypatch.setattr(trainer, "train", no_training)
    again = run_ablation(tmp_path, "APS_v3+CPT")
    assert again["rows"][2]["accs"] == rows["APS_v3+CPT"]["accs"]
    md = (tmp_path / "results" / "ablation-quick-cpu.md").read_text()
    assert "| APS_v3+CPT |" in md
    # each variant's Kendall with FLOPs, and the full set of baselines for the differences
    assert rows["FLOPs"]["kendall_with_flops"] == pytest.approx(1.0)
    assert -1 <= rows["APS_v3+CPT"]["kendall_with_flops"] <= 1
    assert "kendall with FLOPs" in md


def test_ablation_refuses_an_unknown_variant(tmp_path):
    with pytest.raises(Exception, match="unknown variant 'APS_v9'"):
        ablation.main(preset="tiny", variants="APS_v9", gt_n=3, seed=0, device="cpu", data_dir=None,
                      runs=tmp_path / "runs", out=tmp_path / "results")
    assert not (tmp_path / "runs").exists()


def test_gt_recipe_curve_reuses_every_net_it_trained(tmp_path, monkeypatch, micro_data):
    import groundtruth
    import gt_recipe
    import report
    monkeypatch.setitem(presets.PRESETS, "quick", replace(QUICK, eval_subset=64))
    monkeypatch.setattr(groundtruth, "SHARED_GROUND_TRUTH", tmp_path / "groundtruth.json")
    monkeypatch.setattr(report, "N_BOOT", 50)  # 16 intervals here: the test reads none of them

    def run(budgets="0.0625,0.125", name="quick-spread", **overrides):
        gt_recipe.main(**{"preset": "quick", "budgets": budgets, "archs": 5, "arch_seed": 1000,
                          "spread": True, "label_smoothing": None, "train_subset": None,
                          "image_size": None, "width_mult": None, "so_far": False, "device": "cpu",
                          "data_dir": None, "out": tmp_path, **overrides})
        return json.loads((tmp_path / f"gt-recipe-{name}.json").read_text())

    first = run()
    assert [r["epochs"] for r in first["rows"]] == [0.0625, 0.125]
    assert all(r["n"] == 5 and len(r["acc_seed1"]) == 5 for r in first["rows"])
    flops = [supernet.size_of(supernet.decode(c), QUICK.shape)[0]
             for c in first["rows"][0]["archs"]]
    assert flops == sorted(flops)  # across the FLOPs range, smallest first
    for row in first["rows"]:  # every reading of every net, cross-entropy negated
        assert row["readings"].keys() == set(report.READINGS)
        assert row["readings"]["acc"]["seed0"] == row["acc_seed0"]
        assert all(v < 0 for v in row["readings"]["ce"]["seed1"])
    nets = json.loads((tmp_path / "groundtruth.json").read_text())["entries"]
    assert len(nets) == 2 * 5 * 2  # budgets x archs x seeds, each under its own recipe key
    train = groundtruth.train_standalone
    monkeypatch.setattr(groundtruth, "train_standalone", lambda *a, **k: pytest.fail("retrained"))
    assert run()["rows"] == first["rows"]
    # the next recipes of the pilot's order: other images and widths, under keys of their own
    monkeypatch.setattr(groundtruth, "train_standalone", train)
    other = run("0.0625", "quick-px14-w0.25-spread", image_size=14, width_mult=0.25)
    assert (other["settings"]["image_size"], other["settings"]["width_mult"]) == (14, 0.25)
    assert other["rows"][0]["acc_seed0"] != first["rows"][0]["acc_seed0"]
    nets = json.loads((tmp_path / "groundtruth.json").read_text())["entries"]
    assert len(nets) == 3 * 5 * 2


def test_gt_recipe_so_far_reports_the_stored_archs_and_trains_none(tmp_path, monkeypatch,
                                                                   micro_data):
    import groundtruth
    import gt_recipe
    import report
    # the truth a cross-entropy, as small's: the table must still give top-1 as top-1
    monkeypatch.setitem(presets.PRESETS, "quick", replace(QUICK, eval_subset=64, gt_reading="ce"))
    monkeypatch.setattr(groundtruth, "SHARED_GROUND_TRUTH", tmp_path / "groundtruth.json")
    monkeypatch.setattr(report, "N_BOOT", 50)

    def run(archs, so_far):
        gt_recipe.main(preset="quick", budgets="0.0625", archs=archs, arch_seed=1000,
                       spread=False, label_smoothing=None, train_subset=None, image_size=None,
                       width_mult=None, so_far=so_far, device="cpu", data_dir=None, out=tmp_path)
        name = "gt-recipe-quick" + ("-so-far" if so_far else "")
        return json.loads((tmp_path / f"{name}.json").read_text())["rows"][0]

    train = groundtruth.train_standalone
    monkeypatch.setattr(groundtruth, "train_standalone", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(Exception, match="0 of 5 archs have both seeds stored"):
        run(5, so_far=True)
    monkeypatch.setattr(groundtruth, "train_standalone", train)
    done = run(3, so_far=False)
    monkeypatch.setattr(groundtruth, "train_standalone", lambda *a, **k: pytest.fail("trained"))
    so_far = run(5, so_far=True)  # the first 3 of 5 uniform archs are the 3 trained
    assert so_far["n"] == 3 and so_far["archs"] == done["archs"]
    assert so_far["acc_seed0"] == done["acc_seed0"]
    assert 0 < so_far["acc_min"] <= so_far["acc_max"] <= 1
    assert so_far["reading"] == report.READINGS["ce"][0]
    md = (tmp_path / "gt-recipe-quick-so-far.md").read_text()
    assert "3 of 5 archs" in md and "both seeds stored" in md


def test_projected_agreement_is_one_without_seed_noise_and_falls_with_it():
    import numpy as np
    import gt_recipe
    rng = np.random.default_rng(0)
    flops = np.geomspace(1e6, 1e7, 12)
    true = 0.8 + 0.02 * np.log(flops / 1e6)
    uniform = np.geomspace(3e6, 6e6, 200)  # a narrower spread than the pilot's
    assert gt_recipe.projected_kendall(true, true, flops, uniform) == pytest.approx(1.0)
    noisy = [gt_recipe.projected_kendall(true + rng.normal(0, sd, 12), true + rng.normal(0, sd, 12),
                                         flops, uniform) for sd in (0.002, 0.01, 0.05)]
    assert 1 > noisy[0] > noisy[1] > noisy[2] >= 0


def test_ablation_verdicts_give_the_paired_interval_and_flag_a_backwards_floor():
    def row(variant, tau):
        return {"variant": variant, "metrics": {"kendall": tau}}
    rows = [row("FLOPs", -0.5), row("SPOS", 0.1), row(ablation.FULL, 0.2)]
    differences = {"FLOPs": {"kendall_ci": [0.4, 0.9]}, "SPOS": {"kendall_ci": [-0.1, 0.3]}}
    ceiling = {"ceiling": {"kendall": 0.5}}
    verdicts = ablation.targets(rows, ceiling, differences)
    assert [v["met"] for v in verdicts.values()] == [True, True, False]
    text = ablation.verdict_lines(verdicts, rows)
    assert "[0.400, 0.900] is above 0.05" in text
    assert "[-0.100, 0.300] is not above 0.05" in text
    assert "smaller is better, reaches 0.500" in text
    rows[0] = row("FLOPs", 0.1)
    assert "backwards" not in ablation.verdict_lines(verdicts, rows)
    # below 0 with an interval that reaches above it is no sign of anything
    rows[0] = {"variant": "FLOPs", "metrics": {"kendall": -0.018, "kendall_ci": (-0.23, 0.20)}}
    assert "backwards" not in ablation.verdict_lines(verdicts, rows)
    rows[0]["metrics"]["kendall_ci"] = (-0.7, -0.28)
    assert "backwards" in ablation.verdict_lines(verdicts, rows)


def test_ablation_steps_follow_the_papers_order_and_skip_variants_not_run():
    truth = {f"a{i}": float(i) for i in range(8)}
    def row(variant, accs):
        return {"variant": variant, "accs": dict(zip(truth, accs))}
    perfect, reversed_ = [float(i) for i in range(8)], [float(-i) for i in range(8)]
    rows = [{"variant": "FLOPs"}, row("PS", reversed_), row("APS_v3", perfect),
            row("+SSE34", perfect), row("+SSE34+Dis", reversed_)]
    steps = ablation.step_differences(rows, truth)
    # CPT and SSE4 were not run: the order skips them, and FLOPs is no step
    assert list(steps) == ["APS_v3 - PS", "+SSE34 - APS_v3", "+SSE34+Dis - +SSE34"]
    assert steps["APS_v3 - PS"]["kendall"] == pytest.approx(2.0)
    assert steps["+SSE34 - APS_v3"]["kendall"] == pytest.approx(0.0)
    assert steps["+SSE34+Dis - +SSE34"]["kendall"] == pytest.approx(-2.0)
    lo, hi = steps["APS_v3 - PS"]["kendall_ci"]
    assert lo <= 2.0 <= hi
    md = ablation.differences_table({}, steps)
    assert "ablation order, step by step" in md and "| APS_v3 - PS | 2.000" in md
    assert ablation.differences_table({}, {}) == ""


def test_ablation_compare_matches_variants_arch_by_arch_and_refuses_another_truth(tmp_path):
    truth = {f"a{i}": float(i) for i in range(10)}

    def run(rows):
        return {"date": "d", "preset": "quick", "ground_truth": truth,
                "rows": [{"variant": "FLOPs", "metrics": {"kendall": 0.0}}]
                + [{"variant": v, "accs": dict(zip(truth, accs)), "metrics": {"kendall": 0.0}}
                   for v, accs in rows.items()]}
    perfect, reversed_ = [float(i) for i in range(10)], [float(-i) for i in range(10)]
    before = run({"PS": perfect, "CPT": reversed_, "gone": perfect})
    after = run({"CPT": perfect, "PS": perfect, "new": reversed_})
    d = ablation_compare.compare(before, after)
    # only the variants both runs evaluated, in the later run's order; FLOPs has no accs
    assert list(d) == ["CPT", "PS"]
    assert d["CPT"]["kendall"] == pytest.approx(2.0) and not d["CPT"]["same"]
    assert d["PS"]["kendall"] == pytest.approx(0.0) and d["PS"]["same"]
    assert ablation_compare.compare(after, before)["CPT"]["kendall"] == pytest.approx(-2.0)
    with pytest.raises(ValueError, match="different ground truths"):
        ablation_compare.compare(before, {**after, "ground_truth": {"a0": 1.0}})
    files = []
    for name, data in (("before", before), ("after", after)):
        files.append(tmp_path / f"{name}.json")
        files[-1].write_text(json.dumps(data))
    ablation_compare.main(*files, out=tmp_path / "diff")
    md = (tmp_path / "diff.md").read_text()
    assert "| CPT |" in md and "| PS |" in md and "| yes |" in md
    assert json.loads((tmp_path / "diff.json").read_text())["differences"]["PS"]["same"]
    files[0].write_text("{}")
    with pytest.raises(Exception, match="is not an ablation result"):
        ablation_compare.main(*files, out=None)


GPU_CHECK_FILES = {"summary.txt", "tiny-results.json", "speed-gpu.json", "speed-cifar.json",
                   "gpu-results.json", "gpu-report.md", "gpu-scatter.png", "rest.tar.gz"}


def test_gpu_check_dry_run_runs_every_step_and_brings_back_eight_files(dry_run):
    """The device check on the CPU: the smoke preset for tiny and gpu, speed.py at small
    sizes, all in fp32."""
    import search
    assert dry_run.done.returncode == 0, dry_run.done.stdout + dry_run.done.stderr
    out = dry_run.out
    assert {p.name for p in out.iterdir()} == GPU_CHECK_FILES
    summary = (out / "summary.txt").read_text()
    steps = ["environment", "test-gpu", "all-smoke", "speed-gpu", "speed-cifar", "all-gpu"]
    assert all(f"== {s}: exit code 0" in summary for s in steps), summary
    results = json.loads((out / "tiny-results.json").read_text())
    assert results["metrics"]["n"] == presets.SMOKE.gt_n == len(results["archs"])
    assert {"seed_vs_seed", "ceiling"} <= results["noise_ceiling"].keys()
    assert results["search"]["best"]["flops"] <= search.default_budget().flops
    speed = json.loads((out / "speed-gpu.json").read_text())
    assert speed["precision"] == "fp32" and speed["device"]
    assert (out / "gpu-scatter.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_is_remade_from_the_results_alone(dry_run, tmp_path):
    import shutil
    run = tmp_path / "runs" / dry_run.run.name
    shutil.copytree(dry_run.run, run)
    results = json.loads((run / "results.json").read_text())
    report = (run / "report.md").read_text()
    assert "![supernet and FLOPs against the ground truth](scatter.png)" in report
    assert "## Search" in report
    assert "Kendall of the supernet's accuracies with FLOPs" in report
    # the smoke run's 4-arch ground truth is noise: the report says why it gives no corrected
    # value (tests/test_evaluate.py tests both lines)
    withheld = "withheld" in results["corrected"]
    assert ("Not corrected for the ground truth's unreliability" in report) == withheld
    assert ("Corrected for the ground truth's unreliability" in report) == (not withheld)
    assert {"kendall_with_flops", "corrected", "decisive_pairs"} <= results.keys()
    assert all(len(a["seeds"]) == 2 and min(a["seeds"]) <= a["truth"] <= max(a["seeds"])
               for a in results["archs"])  # the scatter's bars
    (run / "report.md").unlink()
    rewrite = subprocess.run([sys.executable, str(ROOT / "nas.py"), "report", "--name", run.name],
                             cwd=tmp_path, capture_output=True, text=True)
    assert rewrite.returncode == 0, rewrite.stderr
    assert (run / "report.md").read_text() == report


def test_picks_trains_every_way_and_remakes_its_table_from_the_committed_files(
        tmp_path, monkeypatch, micro_data):
    """bench/picks.py end to end on a few-step preset, 2 supernet seeds, 2 nets a pick; then
    --table from the files it wrote alone, training nothing."""
    import search
    small = replace(QUICK, gt_n=10, gt_epochs=0.03)
    monkeypatch.setitem(presets.PRESETS, "quick", small)
    monkeypatch.setattr(search, "ALL_POPULATION", 4)
    monkeypatch.setattr(search, "ALL_GENERATIONS", 1)
    # the script's plumbing, not the method: shorter stage lists for the two supernets
    monkeypatch.setattr(picks, "METHODS", {"full": ("warmup", "aps_depth", "cpt"),
                                           "spos": ("warmup", "spos")})
    store, out = tmp_path / "store.json", tmp_path / "results"
    args = dict(preset="quick", seeds=2, top=2, device="cpu", data_dir=None,
                runs=tmp_path / "runs", store=store, out=out)
    picks.main(table_only=False, **args)
    made = json.loads((out / "picks-quick.json").read_text())
    assert set(made["picks"]) == {f"{w}-s{s}" for w in ("full", "spos", "flops", "params")
                                  for s in (0, 1)} | {"uniform"}
    budget = search.default_budget().flops
    for key, pick in made["picks"].items():
        archs = [supernet.decode(c) for c in pick["archs"]]
        assert all(search.challenge_size(a)[0] <= budget for a in archs)
        nets = {supernet.physical_net(a, small.shape) for a in archs}
        assert len(nets) == len(archs)  # distinct nets
        if key != "uniform":
            assert len(archs) == 2
        if key.startswith(("full", "spos")):  # each supernet says which code trained it
            assert pick["commit"] == picks.code_commit()
    # the FLOPs pick is the largest the search met under the budget
    flops = [supernet.size_of(supernet.decode(c), small.shape)[0]
             for c in made["picks"]["flops-s0"]["archs"]]
    assert flops == sorted(flops, reverse=True)
    table = made["table"]
    assert set(table["ways"]) == {"full", "spos", "flops", "params", "uniform"}
    full = table["ways"]["full"]
    assert full["ce"]["pooled"] == pytest.approx(sum(full["ce"]["per_seed"]) / 2)
    c = table["comparisons"]["full - uniform"]["ce"]
    assert c["units"] == [2, len(made["picks"]["uniform"]["archs"])]
    assert c["difference"] == pytest.approx(
        full["ce"]["pooled"] - table["ways"]["uniform"]["ce"]["pooled"])
    assert c["ci"][0] <= c["difference"] <= c["ci"][1] and 0 <= c["welch_p"] <= 1
    # every net of every way is stored with 2 seeds
    entries = json.loads(store.read_text())["entries"]
    stored = {(e["arch"], e["seed"]) for e in entries}
    assert all((code, s) in stored for pick in made["picks"].values()
               for code in pick["archs"] for s in (0, 1))
    # --table: the same table from the committed files, nothing trained
    before = store.read_text()
    (out / "picks-quick.md").unlink()
    picks.main(table_only=True, **{**args, "runs": tmp_path / "nowhere"})
    again = json.loads((out / "picks-quick.json").read_text())
    assert again["table"] == table and store.read_text() == before
    assert not (tmp_path / "nowhere").exists()
    remade = (out / "picks-quick.md").read_text()
    assert "full - uniform" in remade
    assert picks.plain_sentence("full - uniform", table["comparisons"]["full - uniform"]) in remade
    flat = table["at_equal_flops"]["comparisons"]
    assert set(flat) == {f"{w} - uniform" for w in ("full", "spos", "flops", "params")}
    assert "\n".join(picks.equal_flops_lines(table["at_equal_flops"])) in remade
    # a net not yet trained: no table, but how far every pick has got
    gone = made["picks"]["full-s1"]["archs"][0]
    data = json.loads(before)
    data["entries"] = [e for e in data["entries"] if e["arch"] != gone]
    partial_store, partial_out = tmp_path / "partial.json", tmp_path / "partial"
    partial_store.write_text(json.dumps(data))
    partial_out.mkdir()
    (partial_out / "picks-quick.json").write_text((out / "picks-quick.json").read_text())
    picks.main(table_only=True, **{**args, "store": partial_store, "out": partial_out})
    partial = json.loads((partial_out / "picks-quick.json").read_text())["table"]
    assert partial["missing"] == sum(p["archs"].count(gone) for p in made["picks"].values()) > 0
    assert partial["trained"]["full-s1"] == [1, 2]
    assert "full-s1 1/2" in (partial_out / "picks-quick.md").read_text()


def test_each_comparison_of_picks_reads_as_a_sentence_that_follows_its_interval():
    def comparison(difference, lo, hi, p=0.04):
        side = {"difference": difference, "ci": [lo, hi], "welch_p": p, "units": [3, 16]}
        return {"ce": side, "acc": {**side, "difference": -difference, "ci": [-hi, -lo]}}
    better = picks.plain_sentence("full - uniform", comparison(-0.004, -0.007, -0.001))
    assert better.startswith("The full method's search picks better nets than uniform draws")
    assert "-0.0040 [-0.0070, -0.0010]" in better and "+0.40 points [+0.10, +0.70]" in better
    assert "Welch p 0.04;" in better
    worse = picks.plain_sentence("full - flops", comparison(0.003, 0.001, 0.005, p=0.004))
    assert "Welch p 0.004;" in worse  # a small p keeps its digit
    assert worse.startswith("FLOPs as fitness picks better nets than the full method's search")
    level = picks.plain_sentence("spos - uniform", comparison(-0.002, -0.005, 0.001))
    assert "no measurable difference" in level and "better" not in level


def test_picks_interval_is_as_wide_as_few_supernet_seeds_demand():
    # the first 2 seeds of the small run, full against flops (2 nets a seed here): a bootstrap
    # excluded 0; with 2 units a side, Welch's interval must hold it
    full = [[0.3440, 0.3442], [0.3455, 0.3457]]
    flops = [[0.3409, 0.3411], [0.3414, 0.3416]]
    few = picks.compare(full, flops)
    assert few["ci"][0] < 0 < few["ci"][1] and few["welch_p"] > 0.05
    assert few["difference"] == pytest.approx(0.0036)
    side = {**few, "difference": -few["difference"], "ci": [-few["ci"][1], -few["ci"][0]]}
    assert "no measurable difference" in picks.plain_sentence("full - flops",
                                                              {"ce": few, "acc": side})
    # the same spread over 6 seeds a side is a difference
    many = picks.compare(full * 3, flops * 3)
    assert many["ci"][0] > 0 and many["welch_p"] < 0.05
    assert many["difference"] == pytest.approx(few["difference"])


def test_at_equal_flops_tells_a_pick_that_is_better_only_by_size_from_one_that_sees_more():
    rng = np.random.default_rng(0)
    line = lambda mflops: 0.40 - 0.003 * mflops  # noqa: E731
    sizes = {"uniform": list(rng.uniform(3.5, 6.5, 16))}
    ce = {"uniform": [line(x) + rng.normal(0, 0.002) for x in sizes["uniform"]]}
    # flops: larger nets exactly on the line; full: mid-size nets 0.004 below it
    sizes["flops"] = {s: [6.2 + 0.01 * (s + i) for i in range(4)] for s in range(3)}
    ce["flops"] = {s: [line(x) for x in sizes["flops"][s]] for s in range(3)}
    sizes["full"] = {s: [5.0 + 0.01 * (s + i) for i in range(4)] for s in range(3)}
    ce["full"] = {s: [line(x) - 0.004 + 0.0003 * (s - i) for x, i in zip(sizes["full"][s],
                                                                        range(4))]
                  for s in range(3)}
    flat = picks.at_equal_flops(ce, sizes)
    assert flat["slope_per_mflop"] == pytest.approx(-0.003, abs=0.001)
    bigger = picks.compare(picks.units("flops", ce), picks.units("uniform", ce))
    assert bigger["ci"][1] < 0  # raw: flops beats uniform ...
    level = flat["comparisons"]["flops - uniform"]
    assert level["ci"][0] < 0 < level["ci"][1]  # ... by size alone
    assert "as good as their FLOPs predict" in picks.equal_flops_sentence("flops - uniform", level)
    sees = flat["comparisons"]["full - uniform"]
    assert sees["ci"][1] < 0 and sees["difference"] == pytest.approx(-0.004, abs=0.0015)
    assert "better than their FLOPs predict" in picks.equal_flops_sentence("full - uniform", sees)
    assert picks.equal_flops_sentence("full - uniform", sees) in "\n".join(
        picks.equal_flops_lines(flat))
    # uniform nets whose size says nothing: no line, so no way is judged at equal FLOPs
    ce["uniform"] = [0.385 + rng.normal(0, 0.002) for _ in sizes["uniform"]]
    flat = picks.at_equal_flops(ce, sizes)
    assert flat["slope_ci"][0] < 0 < flat["slope_ci"][1]
    words = "\n".join(picks.equal_flops_lines(flat))
    assert "no measurable size effect" in words and "predict" not in words


def test_the_best_distinct_nets_count_codes_of_one_net_once():
    shape = supernet.NetShape(image_size=14, in_channels=1, num_classes=10, width_mult=0.125,
                              divisor=2)
    import search
    scores = {"1332312111110000122222000051110000000000002424640000": 0.9,
              "1332311121110000122222000051110000000000002424640000": 0.8,  # the same net
              "1233233333000000122222000043333300000000003353000000": 0.7,
              "1222331323000000131300000051110000000000002424640000": 0.6}
    best = search.best_distinct(scores, 2, shape)
    assert [supernet.encode(a) for a in best] == [list(scores)[0], list(scores)[2]]
