"""Each diagnostic of bench/mechanisms.py, reduced, and shown to tell a difference: none may be
a number that cannot move."""

import random
import sys
from dataclasses import replace

import pytest
import torch

import events
import supernet
import trainer
from conftest import MICRO, ROOT

sys.path.insert(0, str(ROOT / "bench"))
import mechanisms  # noqa: E402

QUICK = replace(MICRO, epoch_scale=0.004, warmup_epochs=0.25, probe_every=0)


@pytest.fixture(scope="module")
def probe(micro_data):
    return mechanisms.Probe(micro_data, QUICK, per_cell=1, images=64)


@pytest.fixture(scope="module")
def warm(micro_data):
    """A supernet after a short warm-up, so that losses mean something."""
    st = trainer.new_state(QUICK, ("warmup",), 0, "cpu")
    return trainer.train(st, micro_data, None, events.EventLog(None))


def test_the_probe_set_holds_every_depth_cell(probe):
    (lo3, hi3), (lo4, hi4) = supernet.DEPTH_RANGES[2:]
    every = {(d3, d4) for d3 in range(lo3, hi3 + 1) for d4 in range(lo4, hi4 + 1)}
    assert set(mechanisms.CELLS) == every and len(mechanisms.CELLS) == len(every)
    assert sorted((a.depths[2], a.depths[3]) for a in probe.archs) == sorted(every)


def test_interference_of_an_arch_with_itself_on_one_batch_is_one(warm, probe):
    net, arch = warm.net, supernet.sample_arch(random.Random(1))
    g = mechanisms.path_gradient(net, arch, probe.batch)
    m = mechanisms.used_masks(net, arch)
    assert mechanisms.shared_cosine(g, g, m, m) == pytest.approx(1.0, abs=1e-6)
    other = mechanisms.path_gradient(net, supernet.MAX_ARCH, probe.batch)
    assert mechanisms.shared_cosine(g, other, m, mechanisms.used_masks(net, supernet.MAX_ARCH)) < 1
    r = mechanisms.interference(net, probe, pairs=2)
    assert -1 <= r["self_cosine_across_batches"] < 1 and len(r["raw"]) == 3
    assert r["raw_largest_uniform"]["mean"] == pytest.approx(sum(r["raw"][1:]) / 2)


def test_interference_gives_no_ratio_where_the_self_cosine_is_too_small_to_be_a_unit(
        warm, probe, monkeypatch):
    monkeypatch.setattr(mechanisms, "MIN_SELF_COSINE", -2.0)
    r = mechanisms.interference(warm.net, probe, pairs=2)
    assert r["largest_smallest"] == pytest.approx(r["raw"][0] / r["self_cosine_across_batches"])
    monkeypatch.setattr(mechanisms, "MIN_SELF_COSINE", 2.0)
    r = mechanisms.interference(warm.net, probe, pairs=2)
    assert r["largest_smallest"] is None and r["largest_uniform"] is None
    assert r["raw_largest_smallest"] == r["raw"][0]


def test_forgetting_is_zero_with_nothing_trained_and_positive_after_a_large_lr(warm, probe):
    before = {k: v.clone() for k, v in warm.net.state_dict().items()}
    none = mechanisms.two_model_forgetting(warm.net, probe, lr=0.1, steps=0)
    assert all(v == 0 for r in none.values() for v in r.values())
    wrecked = mechanisms.two_model_forgetting(warm.net, probe, lr=3.0, steps=5)
    assert wrecked["largest after depth-2 training"]["batch"] > 0.1
    for k, v in warm.net.state_dict().items():  # the weights were restored
        assert torch.equal(v, before[k]), k


def test_forgetting_under_cpt_is_zero_at_lr_zero_and_moves_otherwise(warm, probe):
    still = mechanisms.forgetting_under_cpt(warm.net, probe, lr=0.0, steps=5, window=2,
                                           pool_size=2)
    assert still["floor"] == 0.0  # nothing moved: both batches see no forgetting
    assert all(still[arm]["mean"]["mean"] == 0 for arm in ("no pool", "random pool", "CPT pool"))
    moving = mechanisms.forgetting_under_cpt(warm.net, probe, lr=0.5, steps=5, window=2,
                                            pool_size=2)
    assert any(moving[arm]["mean"]["mean"] != 0 for arm in ("no pool", "random pool", "CPT pool"))
    assert moving["floor"] > 0  # the same forgetting read on a second batch differs
    assert moving["CPT pool"]["pool_mean_distance"] > 0


def test_recovery_gain_is_zero_without_steps_and_positive_for_an_untrained_supernet(probe):
    st = trainer.new_state(QUICK, ("warmup",), 0, "cpu")
    probe.archs = probe.archs[:4]
    none = mechanisms.recovery_gains(st, probe, lr=0.05, steps=0)
    assert all(abs(g["gain"]) < 1e-4 for g in none.values())
    trained = mechanisms.recovery_gains(st, probe, lr=0.05, steps=8)
    assert sum(g["gain"] for g in trained.values()) > 0
    grid = mechanisms.cell_map(trained)
    assert len(grid) == 7 and len(grid[0]) == 4


def test_feature_shift_is_zero_for_one_path_and_positive_across_paths(warm, probe):
    x = probe.batch[0]
    a, b = supernet.sample_arch(random.Random(2)), supernet.sample_arch(random.Random(3))
    fa, fb = mechanisms.stage_inputs(warm.net, x, a), mechanisms.stage_inputs(warm.net, x, b)
    assert set(fa) == {"stage 2 input", "stage 3 input", "stage 4 input", "pooled"}
    assert mechanisms.channel_shift(fa["pooled"], fa["pooled"]) == 0
    assert mechanisms.channel_shift(fa["pooled"], fb["pooled"]) > 0
    r = mechanisms.feature_shift(warm.net, probe, pairs=2)
    assert all(r["channel_shift"][s]["mean"] > 0 for s in fa)


def test_coherence_is_one_for_one_direction_and_falls_for_independent_ones():
    step = torch.randn(50)
    assert mechanisms.coherence([step] * 5) == pytest.approx(1.0)
    orthogonal = list(torch.eye(16))
    assert mechanisms.coherence(orthogonal) == pytest.approx(0.25)


def test_parameter_shift_runs_the_student_and_restores_it(micro_data, probe):
    st = trainer.new_state(replace(QUICK, queue_size=64), ("pinas",), 0, "cpu")
    before = {k: v.clone() for k, v in st.net.state_dict().items()}
    r = mechanisms.parameter_shift(st, probe, steps=3, cross_path=True, paths=2)
    assert 0 < r["coherence"] <= 1 and r["path_variance"] > 0
    for k, v in st.net.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_consecutive_rankings_agree_fully_when_nothing_moved():
    same = [("cpt", 0, [0.1, 0.3, 0.2]), ("cpt", 5, [0.1, 0.3, 0.2]),
            ("sse34", 0, [0.3, 0.2, 0.1]), ("sse34", 5, [0.1, 0.2, 0.3])]
    assert mechanisms.consecutive_kendall(same) == {"cpt": [1.0], "sse34": [-1.0]}


def test_the_controls_train_what_they_say(micro_data):
    """SSE34 without its split keeps one copy for every arch; Π-NAS's control has same-path
    positives and keeps that through a checkpoint."""
    shared = trainer.new_state(QUICK, ("cpt", "sse34_shared"), 0, "cpu", kd=False)
    trainer.train(shared, micro_data, None, events.EventLog(None))
    assert list(shared.sse.weights) == [0] and shared.sse.owner(supernet.MAX_ARCH) == 0
    st = trainer.new_state(replace(QUICK, queue_size=64), ("pinas_same_path",), 0, "cpu")
    phase = st.phases()[0]
    mechanisms.stages.CONTROLS["pinas_same_path"].begin(st, phase, None, None)
    assert st.pinas.cross_path is False
    assert st.state_dict()["pinas"]["cross_path"] is False
