import json
import math
import random
import statistics

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import evaluate
import events
import groundtruth
import report
import supernet
import trainer
from conftest import MICRO


def test_calibration_is_the_exact_mean_of_batch_statistics_in_the_arch_slice():
    torch.manual_seed(0)
    net = supernet.Supernet(MICRO.shape)
    arch = supernet.sample_arch(random.Random(3))
    batches = [torch.randn(16, 1, 28, 28) for _ in range(3)]
    stem_bn = net.stem.bn
    before_mean, before_var = stem_bn.running_mean.clone(), stem_bn.running_var.clone()
    unused_block = net.stages[2][7].conv1.bn.running_mean.clone()
    evaluate.calibrate_bn(net, arch, batches)
    c = MICRO.shape.ch(supernet.STEM_BASE, arch.stem)
    outs = [F.conv2d(x, net.stem.weight[:c], padding=1) for x in batches]
    means = torch.stack([o.mean((0, 2, 3)) for o in outs]).mean(0)
    varis = torch.stack([o.transpose(0, 1).flatten(1).var(1, unbiased=True) for o in outs]).mean(0)
    torch.testing.assert_close(stem_bn.running_mean[:c], means, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(stem_bn.running_var[:c], varis, rtol=1e-4, atol=1e-5)
    # other archs' slices: channels beyond c and blocks this arch does not run keep their values
    assert torch.equal(stem_bn.running_mean[c:], before_mean[c:])
    assert torch.equal(stem_bn.running_var[c:], before_var[c:])
    assert arch.depths[2] < 8  # so its block 8 of stage 3 is one the arch does not run
    assert torch.equal(net.stages[2][7].conv1.bn.running_mean, unused_block)
    assert all(bn.momentum == 0.1 for bn in net.modules() if isinstance(bn, torch.nn.BatchNorm2d))


def test_calibration_and_accuracy_are_deterministic(micro_data):
    st = trainer.new_state(MICRO, ("warmup",), 0, "cpu")
    archs = [supernet.sample_arch(random.Random(i)) for i in range(3)]
    calib = micro_data.calib_batches(2, 32, seed=0)
    evals = micro_data.eval_batches(128, 64)
    before = {k: v.clone() for k, v in st.net.state_dict().items()}
    first = evaluate.evaluate_archs(st.net, None, archs, calib, evals)
    second = evaluate.evaluate_archs(st.net, None, archs[::-1], calib, evals)
    assert first == second and len(first) == 3
    # and an evaluation (a rank probe during training) leaves the BN statistics as they were
    stats = [k for k in before if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(st.net.state_dict()[k], before[k]) for k in stats)


def test_rank_metrics_match_hand_computed_values():
    m = report.rank_metrics([1, 2, 3, 4], [1, 3, 2, 4], n_boot=200)
    assert m["n"] == 4
    assert m["kendall"] == pytest.approx((5 - 1) / 6)          # 5 concordant, 1 discordant pair
    assert m["spearman"] == pytest.approx(1 - 6 * 2 / (4 * 15))  # sum of squared rank differences 2
    assert m["pearson"] == pytest.approx(0.8)                     # cov 1.0 / var 1.25
    lo, hi = m["kendall_ci"]
    assert -1 <= lo <= hi <= 1
    perfect = report.rank_metrics([0.1, 0.5, 0.2, 0.9, 0.7], [1, 5, 2, 9, 7], n_boot=0)
    assert perfect["kendall"] == pytest.approx(1.0) and perfect["spearman"] == pytest.approx(1.0)
    assert "kendall_ci" not in perfect


def test_paired_difference_is_the_metric_difference_with_an_interval_around_it():
    rng = random.Random(0)
    truth = [rng.random() for _ in range(30)]
    good = [t + 0.05 * rng.random() for t in truth]
    poor = [t + 0.8 * rng.random() for t in truth]
    d = report.paired_difference(good, poor, truth, n_boot=300)
    for name in report.METRICS:
        fn = report.METRICS[name]
        assert d[name] == pytest.approx(fn(good, truth) - fn(poor, truth))
        assert 0 < d[f"{name}_ci"][0] <= d[name] <= d[f"{name}_ci"][1]
    same = report.paired_difference(good, good, truth, n_boot=100)
    assert same["kendall"] == 0 and same["kendall_ci"] == [0.0, 0.0]


def test_ground_truth_cache_skips_trained_archs_and_resumes(tmp_path, monkeypatch, micro_data):
    calls = []

    def fake_train(arch, preset, data, seed, progress=None):
        calls.append((supernet.encode(arch), seed))
        if len(calls) == 3 and not resumed:
            raise KeyboardInterrupt  # killed while training the third net
        return {"acc": 0.5 + 0.01 * len(calls) + 0.001 * seed}

    monkeypatch.setattr(groundtruth, "train_standalone", fake_train)
    archs = [supernet.sample_arch(random.Random(i)) for i in range(4)]
    codes = [supernet.encode(a) for a in archs]
    log = events.EventLog(None)
    resumed = False
    with pytest.raises(KeyboardInterrupt):
        groundtruth.ground_truth(groundtruth.GroundTruth(tmp_path / "gt.json"), archs, 2, MICRO,
                                 micro_data, log)
    assert len(json.loads((tmp_path / "gt.json").read_text())["entries"]) == 2
    resumed = True
    calls.clear()
    truth, ceiling = groundtruth.ground_truth(groundtruth.GroundTruth(tmp_path / "gt.json"),
                                              archs, 2, MICRO, micro_data, log)
    # each arch's seeds one after the other; the first arch's two nets were kept
    assert calls == [(codes[1], 0), (codes[1], 1), (codes[2], 0), (codes[2], 1), (codes[3], 0),
                     (codes[3], 1)]
    gt = groundtruth.GroundTruth(tmp_path / "gt.json")
    r = groundtruth.recipe_key(MICRO, "cpu")
    for c in codes:  # the truth is the mean of the two seeds
        assert truth[c] == pytest.approx((gt.get(c, MICRO.dataset, r, 0)
                                          + gt.get(c, MICRO.dataset, r, 1)) / 2)
    assert ceiling["seed_vs_seed"]["n"] == 4 and ceiling["ceiling"]["n"] == 4
    calls.clear()
    groundtruth.ground_truth(groundtruth.GroundTruth(tmp_path / "gt.json"), archs, 2, MICRO,
                             micro_data, log)
    assert calls == []


def test_a_run_takes_committed_ground_truth_instead_of_training(tmp_path, monkeypatch, micro_data):
    archs = groundtruth.pick_archs(3, 0, MICRO)
    r = groundtruth.recipe_key(MICRO, "cpu")
    shared = groundtruth.GroundTruth(tmp_path / "shared.json")
    for i, a in enumerate(archs):
        for seed in (0, 1):
            shared.put(supernet.encode(a), MICRO.dataset, r, seed,
                       {"acc": 0.6 + 0.1 * i + 0.01 * seed}, 1.0)
    monkeypatch.setattr(groundtruth, "SHARED_GROUND_TRUTH", tmp_path / "shared.json")
    monkeypatch.setattr(groundtruth, "train_standalone",
                        lambda *a: pytest.fail("trained a shared net"))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    truth, ceiling = groundtruth.build_ground_truth(run_dir, MICRO, micro_data,
                                                 events.EventLog(None), 3, 2, 0)
    assert list(truth.values()) == pytest.approx([0.605, 0.705, 0.805])
    assert ceiling["seed_vs_seed"]["kendall"] == pytest.approx(1.0)
    # the run folder holds its own copy: the shared file may go
    (tmp_path / "shared.json").unlink()
    assert groundtruth.stored_ground_truth(run_dir, MICRO, "cpu")[0] == truth


def test_a_cross_entropy_truth_ranks_lower_loss_higher_and_retrains_nets_without_it(
        tmp_path, monkeypatch, micro_data):
    """gt_reading "ce" (`small`, `gpu`): the truth is minus the mean held-out cross-entropy, so
    the net with the lowest loss ranks first whatever its top-1; a net stored before the
    reading was measured is trained again rather than read as missing."""
    from dataclasses import replace
    by_ce = replace(MICRO, gt_reading="ce")
    archs = groundtruth.pick_archs(3, 0, by_ce)
    codes = [supernet.encode(a) for a in archs]
    r = groundtruth.recipe_key(by_ce, "cpu")
    gt = groundtruth.GroundTruth(tmp_path / "gt.json")
    for i, c in enumerate(codes):  # top-1 rises with i, cross-entropy rises too
        for seed in (0, 1):
            gt.put(c, MICRO.dataset, r, seed, {"acc": 0.6 + 0.1 * i, "ce": 1.0 + i + 0.1 * seed},
                   1.0)
    gt.put(codes[2], MICRO.dataset, r, 1, {"acc": 0.8}, 1.0)  # an old net: no cross-entropy
    trained = []
    monkeypatch.setattr(groundtruth, "train_standalone", lambda a, p, d, seed, progress=None: (
        trained.append((supernet.encode(a), seed)) or {"acc": 0.8, "ce": 3.1}))
    truth, _ = groundtruth.ground_truth(groundtruth.GroundTruth(tmp_path / "gt.json"), archs, 2,
                                        by_ce, micro_data, events.EventLog(None))
    assert trained == [(codes[2], 1)]
    assert [truth[c] for c in codes] == pytest.approx([-1.05, -2.05, -3.05])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (tmp_path / "gt.json").rename(run_dir / "groundtruth.json")
    assert groundtruth.stored_ground_truth(run_dir, by_ce, "cpu")[0] == pytest.approx(truth)


def test_uniform_sample_extends_and_the_stratified_one_is_wider():
    small, large = groundtruth.pick_archs(10, 5, MICRO), groundtruth.pick_archs(30, 5, MICRO)
    assert large[:10] == small and len(set(large)) == 30
    rng = random.Random(5)
    assert small[0] == supernet.sample_arch(rng)  # plain uniform draws, in order
    flops = lambda archs: sorted(supernet.size_of(a, MICRO.shape)[0] for a in archs)
    uniform, strata = flops(small[:6]), flops(groundtruth.pick_archs(6, 5, MICRO, stratified=True))
    assert strata[-1] - strata[0] > uniform[-1] - uniform[0]


def test_ceiling_is_spearman_brown_for_a_mean_of_two_seeds():
    assert report.spearman_brown_ceiling(0.6, "pearson") == pytest.approx((2 * 0.6 / 1.6) ** 0.5)
    assert report.spearman_brown_ceiling(1.0, "kendall") == pytest.approx(1.0)
    assert report.spearman_brown_ceiling(-0.2, "kendall") == 0.0
    for name in ("kendall", "spearman"):  # above R itself, below 1
        assert 0.5 < report.spearman_brown_ceiling(0.5, name) < 1.0
    # Kendall 1/3 is Pearson sin(pi/6) = 0.5 for a bivariate normal
    r = (2 * 0.5 / 1.5) ** 0.5
    assert report.spearman_brown_ceiling(1 / 3, "kendall") == pytest.approx(
        2 / 3.141592653589793 * __import__("math").asin(r))


def test_correction_for_unreliability_divides_by_the_root_of_the_2_seed_reliability():
    # R = 0.5: the 2-seed mean's reliability is 2/3, so a Pearson of 0.5 becomes 0.5 / sqrt(2/3)
    assert report.corrected_for_unreliability(0.5, 0.5, "pearson") == pytest.approx(
        0.5 / (2 / 3) ** 0.5)
    assert report.corrected_for_unreliability(0.4, 1.0, "kendall") == pytest.approx(0.4)
    assert report.corrected_for_unreliability(0.9, 0.1, "pearson") == 1.0  # clipped
    assert report.corrected_for_unreliability(0.3, -0.1, "kendall") is None
    seeds = {"pearson": 0.5, "kendall": 0.3, "spearman": 0.0}
    reliable = report.ceiling_metrics({**seeds, "n": 9, "pearson_ci": [0.4, 0.6],
                                       "kendall_ci": [0.25, 0.4], "spearman_ci": [-0.3, 0.3]})
    m = report.corrected_metrics({"n": 9, "pearson": 0.5, "kendall": 0.3, "spearman": 0.4,
                                  "kendall_ci": [0.1, 0.5]}, seeds, reliable)
    assert m["kendall"] > 0.3 and m["kendall_ci"][0] > 0.1 and m["spearman"] is None
    # the report says it where the truth is reliable enough to divide by its ceiling
    line = "Corrected for the ground truth's unreliability"
    assert any(line in x for x in report.extras_lines({"corrected": m}))
    assert report.results_table({"metrics": {}, "flops": {}, "params": {}, "corrected": m}
                                )["rows"]["supernet, corrected"] is m
    # and says in words why not where the ceiling's interval reaches down to near 0 (the tiny
    # run's ceiling printed a corrected Kendall of 1.000 [-0.53, 1.00] before this rule)
    agree = {"pearson": 0.6, "kendall": 0.5, "spearman": 0.6}
    shaky = report.ceiling_metrics({**agree, "n": 8, "pearson_ci": [-0.5, 0.9],
                                    "kendall_ci": [-0.4, 0.8], "spearman_ci": [-0.5, 0.9]})
    assert shaky["kendall"] > 0.5  # the point estimate alone would pass
    withheld = report.corrected_metrics({"n": 8, "pearson": 0.9, "kendall": 0.8,
                                         "spearman": 0.9}, agree, shaky)
    assert all(withheld[k] is None for k in report.METRICS)
    lines = report.extras_lines({"corrected": withheld})
    assert not any(line in x for x in lines) and any("Not corrected" in x for x in lines)
    row = report.results_table({"metrics": {}, "flops": {}, "params": {},
                                "corrected": withheld})["rows"]["supernet, corrected"]
    assert "not estimable" in row["note"]


def test_decided_pairs_are_those_apart_by_twice_the_seed_noise():
    truth = [0.0, 1.0, 1.1, 3.0]
    # noise 0.2: the threshold 0.4 leaves out the pair (1.0, 1.1) only
    right = report.decisive_pair_agreement(truth, truth, 0.2, n_boot=50)
    assert right["pairs"] == 5 and right["share"] == 1.0
    swapped = [0.0, 1.1, 1.0, 3.0]  # wrong only on the undecided pair
    assert report.decisive_pair_agreement(swapped, truth, 0.2, n_boot=0)["share"] == 1.0
    backwards = report.decisive_pair_agreement([-t for t in truth], truth, 0.2, n_boot=0)
    assert backwards["share"] == 0.0
    none = report.decisive_pair_agreement(truth, truth, 10.0, n_boot=0)
    assert none["pairs"] == 0 and math.isnan(none["share"])


def test_the_seed_noise_is_one_nets_sd_from_the_seed_differences():
    first = {"a": 0.1, "b": 0.5, "c": 0.9, "d": 0.3}
    second = {"a": 0.2, "b": 0.4, "c": 1.0, "d": 0.2}  # differences -0.1, 0.1, -0.1, 0.1
    noise = report.noise_ceiling([first, second])["seed_noise"]
    assert noise == pytest.approx(statistics.stdev([-0.1, 0.1, -0.1, 0.1]) / 2 ** 0.5)


def test_standalone_training_learns(micro_data):
    from dataclasses import replace
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same float order on every machine
    try:
        small = supernet.decode("1" + "2222" + "3" + ("33" * 2 + "00" * 3) * 2 + "55" * 2
                                + "00" * 6 + "77" * 2 + "00" * 3)
        m = groundtruth.train_standalone(small, replace(MICRO, gt_epochs=4), micro_data, seed=0)
    finally:
        torch.set_num_threads(threads)
    assert m["acc"] > 0.4 and m["acc_flip"] > 0.4  # ten classes: chance is 0.1
    assert m["ce"] < math.log(10) and m["ce_flip"] < math.log(10)  # below a uniform guess's


def test_flip_averaged_readings_agree_for_a_mirror_symmetric_net_and_are_convex_otherwise():
    torch.manual_seed(0)
    x, y = torch.randn(64, 1, 6, 6), torch.randint(0, 10, (64,))
    pooled = nn.Sequential(nn.Conv2d(1, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                           nn.Linear(4, 10))  # a 1x1 conv then a mean: blind to mirroring
    m = evaluate.heldout_metrics(pooled, [(x, y)])
    assert m["acc_flip"] == m["acc"] and m["ce_flip"] == pytest.approx(m["ce"], rel=1e-5)
    flat = nn.Sequential(nn.Flatten(), nn.Linear(36, 10))  # sees where each pixel is
    m = evaluate.heldout_metrics(flat, [(x, y)])
    mirrored = evaluate.heldout_metrics(flat, [(x.flip(3), y)])
    # the cross-entropy of the mean of two softmaxes is below the mean of their cross-entropies
    assert m["ce_flip"] < (m["ce"] + mirrored["ce"]) / 2


def test_challenge_json_round_trips_and_bad_files_are_refused(tmp_path):
    rng = random.Random(0)
    codes = {f"arch{i}": supernet.encode(supernet.sample_arch(rng)) for i in range(1, 6)}
    src = tmp_path / "in.json"
    src.write_text(json.dumps({k: {"acc": 0.0, "arch": c} for k, c in codes.items()}))
    assert supernet.read_challenge(src) == codes
    accs = {c: 0.1 * i for i, c in enumerate(codes.values())}
    report.write_challenge(tmp_path / "out.json", codes, accs)
    back = json.loads((tmp_path / "out.json").read_text())
    assert {k: v["arch"] for k, v in back.items()} == codes
    assert back["arch2"]["acc"] == pytest.approx(0.1)
    (tmp_path / "bad.json").write_text("{\"arch1\": ")
    with pytest.raises(ValueError, match="not valid JSON"):
        supernet.read_challenge(tmp_path / "bad.json")
    (tmp_path / "bad.json").write_text(json.dumps({"arch1": {"arch": codes["arch1"]},
                                                   "arch2": {"arch": "15"}}))
    with pytest.raises(ValueError, match="entry 'arch2': arch code has length 2"):
        supernet.read_challenge(tmp_path / "bad.json")


def test_the_challenges_candidate_file_is_in_the_repository_and_reads():
    import gzip
    raw = json.loads(gzip.decompress(supernet.CHALLENGE_CANDIDATES.read_bytes()))
    archs = supernet.read_candidates(supernet.CHALLENGE_CANDIDATES)
    assert len(raw) == 45000 and len(archs) == len({v["arch"] for v in raw.values()})
    assert supernet.encode(archs[0]) == raw["arch1"]["arch"]


def test_recipe_key_covers_every_setting_and_not_how_a_number_is_written():
    from dataclasses import replace
    base = groundtruth.recipe_key(MICRO, "cpu")
    quarter = replace(MICRO, gt_epochs=int(MICRO.gt_epochs * 4) / 4)
    assert groundtruth.recipe_key(quarter, "cpu") == base
    assert groundtruth.recipe_key(replace(MICRO, gt_epochs=1), "cpu") == groundtruth.recipe_key(
        replace(MICRO, gt_epochs=1.0), "cpu")
    for change in ({"gt_label_smoothing": 0.1}, {"image_size": 28}, {"gt_batch_size": 64},
                   {"gt_lr": 0.2}, {"train_subset": 256}):
        assert groundtruth.recipe_key(replace(MICRO, **change), "cpu") != base, change
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        assert groundtruth.recipe_key(MICRO, "cpu") != base
    finally:
        torch.set_num_threads(threads)


def test_small_finds_its_stand_alone_nets_in_the_committed_ground_truth():
    """`small`'s recipe (12 epochs of all 60,000 images, 2 threads) is the one the pilot of
    issue 21 measured: the nets it trained under it are found under `small`'s key, and so is
    every net of the headline ground truth (the 40 archs `nas.py all --preset small` ranks, both
    seeds, 2026-12-05), so the preset's ground truth is read, never retrained."""
    import presets
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        key = groundtruth.recipe_key(presets.SMALL, "cpu")
    finally:
        torch.set_num_threads(threads)
    assert key == "gt-dc4d41531f"
    assert presets.SMALL.gt_reading == "ce"
    stored = groundtruth.GroundTruth(groundtruth.SHARED_GROUND_TRUTH)
    pilot = [e for e in stored.entries.values() if e["recipe"] == key]
    assert len(pilot) >= 24 + 80 and all("ce" in e and e["ce"] > 0 for e in pilot)
    for arch in groundtruth.pick_archs(40, 0, presets.SMALL):  # the headline archs
        for seed in (0, 1):
            assert stored.get(supernet.encode(arch), "fashion-mnist", key, seed) is not None


def test_the_committed_ground_truth_is_found_under_the_key_it_was_trained_with():
    """The recipe key of nets in bench/results/groundtruth.json must not change when the code
    does: here the 6-epoch headline recipe of `small` (2026-12-02, 80 nets), at 2 threads."""
    import presets
    six_epochs = presets.Preset(
        name="small", dataset="fashion-mnist", image_size=14, in_channels=1, num_classes=10,
        width_mult=0.125, divisor=2, batch_size=256, epoch_scale=0.18, lr_scale=10,
        warmup_epochs=12, warmup_lr=0.1, train_subset=10000, calib_batches=10,
        gt_epochs=6, gt_lr=0.1, gt_batch_size=256, gt_label_smoothing=0.1, gt_n=40)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        key = groundtruth.recipe_key(six_epochs, "cpu")
    finally:
        torch.set_num_threads(threads)
    assert key == "gt-a2f568dd02"
    stored = groundtruth.GroundTruth(groundtruth.SHARED_GROUND_TRUTH)
    for arch in groundtruth.pick_archs(40, 0, six_epochs):  # the headline archs, both seeds
        for seed in (0, 1):
            assert stored.get(supernet.encode(arch), "fashion-mnist", key, seed) is not None
