import json
import random

import pytest
import torch
import torch.nn.functional as F

import evaluate as ev
import supernet as sn
import train_stages as ts
from conftest import CHALLENGE_JSON, MICRO


def test_calibration_is_the_exact_mean_of_batch_statistics_in_the_arch_slice():
    torch.manual_seed(0)
    net = sn.Supernet(MICRO.shape)
    arch = sn.sample_arch(random.Random(3))
    batches = [torch.randn(16, 1, 28, 28) for _ in range(3)]
    stem_bn = net.stem.bn
    before_mean, before_var = stem_bn.running_mean.clone(), stem_bn.running_var.clone()
    unused_block = net.stages[2][7].conv1.bn.running_mean.clone()
    ev.calibrate_bn(net, arch, batches)
    c = MICRO.shape.ch(sn.STEM_BASE, arch.stem)
    outs = [F.conv2d(x, net.stem.weight[:c], padding=1) for x in batches]
    means = torch.stack([o.mean((0, 2, 3)) for o in outs]).mean(0)
    varis = torch.stack([o.transpose(0, 1).flatten(1).var(1, unbiased=True) for o in outs]).mean(0)
    torch.testing.assert_close(stem_bn.running_mean[:c], means, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(stem_bn.running_var[:c], varis, rtol=1e-4, atol=1e-5)
    # other archs' slices: channels beyond c and blocks this arch does not run keep their values
    assert torch.equal(stem_bn.running_mean[c:], before_mean[c:]) and torch.equal(stem_bn.running_var[c:], before_var[c:])
    if arch.depths[2] < 8:
        assert torch.equal(net.stages[2][7].conv1.bn.running_mean, unused_block)
    assert all(bn.momentum == 0.1 for bn in net.modules() if isinstance(bn, torch.nn.BatchNorm2d))


def test_calibration_and_accuracy_are_deterministic(micro_data):
    st = ts.new_state(MICRO, ("warmup",), 0, "cpu")
    archs = [sn.sample_arch(random.Random(i)) for i in range(3)]
    calib = micro_data.calib_batches(2, 32, seed=0)
    evals = micro_data.eval_batches(128, 64)
    first = ev.evaluate_archs(st, archs, calib, evals)
    second = ev.evaluate_archs(st, archs[::-1], calib, evals)
    assert first == second and len(first) == 3
    assert all(0.0 <= a <= 1.0 for a in first.values())


def test_rank_metrics_match_hand_computed_values():
    m = ev.rank_metrics([1, 2, 3, 4], [1, 3, 2, 4], n_boot=200)
    assert m["n"] == 4
    assert m["kendall"] == pytest.approx((5 - 1) / 6)          # 5 concordant, 1 discordant pair
    assert m["spearman"] == pytest.approx(1 - 6 * 2 / (4 * 15))  # sum of squared rank differences 2
    assert m["pearson"] == pytest.approx(0.8)                     # cov 1.0 / var 1.25
    lo, hi = m["kendall_ci"]
    assert -1 <= lo <= hi <= 1
    perfect = ev.rank_metrics([0.1, 0.5, 0.2, 0.9, 0.7], [1, 5, 2, 9, 7], n_boot=0)
    assert perfect["kendall"] == pytest.approx(1.0) and perfect["spearman"] == pytest.approx(1.0)
    assert "kendall_ci" not in perfect


def test_ground_truth_cache_skips_trained_archs_and_resumes(tmp_path, monkeypatch, micro_data):
    calls = []

    def fake_train(arch, preset, data, seed):
        calls.append((sn.encode(arch), seed))
        if len(calls) == 3 and not resumed:
            raise KeyboardInterrupt  # killed while training the third
        return 0.5 + 0.01 * len(calls)

    monkeypatch.setattr(ev, "train_standalone", fake_train)
    archs = [sn.sample_arch(random.Random(i)) for i in range(4)]
    resumed = False
    with pytest.raises(KeyboardInterrupt):
        ev.ground_truth(ev.GroundTruth(tmp_path / "gt.json"), archs, archs[:3], MICRO, micro_data, ts.EventLog(None))
    assert len(json.loads((tmp_path / "gt.json").read_text())["entries"]) == 2
    resumed, calls[:] = True, []
    truth, ceiling = ev.ground_truth(ev.GroundTruth(tmp_path / "gt.json"), archs, archs[:3], MICRO, micro_data,
                                     ts.EventLog(None))
    assert [c for c, _ in calls] == [sn.encode(a) for a in archs[2:]] + [sn.encode(a) for a in archs[:3]]
    assert set(truth) == {sn.encode(a) for a in archs} and ceiling["n"] == 3
    calls.clear()
    ev.ground_truth(ev.GroundTruth(tmp_path / "gt.json"), archs, archs[:3], MICRO, micro_data, ts.EventLog(None))
    assert calls == []


def test_standalone_training_learns(micro_data):
    from dataclasses import replace
    acc = ev.train_standalone(sn.decode(sn.MAX_CODE), replace(MICRO, gt_epochs=2), micro_data, seed=0)
    assert acc > 0.4  # ten classes: chance is 0.1


def test_challenge_json_round_trips_and_bad_files_are_refused(tmp_path):
    rng = random.Random(0)
    codes = {f"arch{i}": sn.encode(sn.sample_arch(rng)) for i in range(1, 6)}
    src = tmp_path / "in.json"
    src.write_text(json.dumps({k: {"acc": 0.0, "arch": c} for k, c in codes.items()}))
    assert ev.read_challenge(src) == codes
    accs = {c: 0.1 * i for i, c in enumerate(codes.values())}
    ev.write_challenge(tmp_path / "out.json", codes, accs)
    back = json.loads((tmp_path / "out.json").read_text())
    assert {k: v["arch"] for k, v in back.items()} == codes and back["arch2"]["acc"] == pytest.approx(0.1)
    (tmp_path / "bad.json").write_text("{\"arch1\": ")
    with pytest.raises(ValueError, match="not valid JSON"):
        ev.read_challenge(tmp_path / "bad.json")
    (tmp_path / "bad.json").write_text(json.dumps({"arch1": {"arch": codes["arch1"]}, "arch2": {"arch": "15"}}))
    with pytest.raises(ValueError, match="entry 'arch2': arch code has length 2"):
        ev.read_challenge(tmp_path / "bad.json")


def test_the_real_challenge_file_reads():
    if not CHALLENGE_JSON.exists():
        pytest.skip(f"the challenge's candidate file is absent ({CHALLENGE_JSON})")
    assert len(ev.read_challenge(CHALLENGE_JSON)) == 45000
