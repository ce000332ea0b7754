import json
import os
import random
import signal
from dataclasses import replace

import pytest
import torch

import supernet
import train_stages
from conftest import MICRO

# Π-NAS in about 6 steps: the stage is as long as SPOS (70 paper epochs).
PINAS = replace(MICRO, epoch_scale=0.005, queue_size=128, log_every=1)


def pinas_state(preset=PINAS):
    st = train_stages.new_state(preset, ("pinas",), 0, "cpu")
    train_stages.start_pinas(st)
    return st


def test_the_two_paths_differ_in_every_choice():
    rng = random.Random(0)
    spaces = [(train_stages.FULL_DEPTHS, supernet.WIDTH_CODES),
              (((4, 5), (4, 5), (6, 8), (2, 5)), ((1, 2, 3),) * 4)]
    for depth_ranges, widths in spaces:
        for _ in range(500):
            a, b = train_stages.sample_path_pair(rng, depth_ranges, widths)
            for s in range(4):
                assert a.depths[s] != b.depths[s] and a.outs[s] != b.outs[s]
                assert all(x != y for x, y in zip(a.mids[s], b.mids[s]))
                lo, hi = depth_ranges[s]
                for arch in (a, b):
                    assert lo <= arch.depths[s] <= hi
                    assert set(arch.mids[s]) | {arch.outs[s]} <= set(widths[s])
                    assert len(arch.mids[s]) == arch.depths[s]


def test_a_choice_with_one_option_is_shared():
    a, b = train_stages.sample_path_pair(random.Random(1), train_stages.MAX_ONLY,
                                         train_stages.WIDEST)
    assert a == b == supernet.MAX_ARCH


def test_mean_teacher_moves_exactly_the_used_slices_by_the_ema_rule(micro_data):
    st = pinas_state()
    with torch.no_grad():
        for p in st.mean_teacher.parameters():
            p.add_(torch.randn_like(p))  # student and teacher now differ everywhere
    a, b = train_stages.sample_path_pair(random.Random(3))
    # which weights a path uses, found independently of the code under test: where its gradient is
    x, _ = micro_data.train_batch(0, 0, 8)
    st.net.zero_grad()
    st.projector.zero_grad()
    for arch in (a, b):
        st.projector(st.net.features(x, arch)).sum().backward()
    before = {k: v.clone() for k, v in st.mean_teacher.state_dict().items()}
    m = 0.9
    train_stages.update_mean_teacher(st, [a, b], momentum=m)
    students = {"net": dict(st.net.named_parameters()),
                "projector": dict(st.projector.named_parameters())}
    moved = 0
    for name, t in st.mean_teacher.named_parameters():
        owner, pname = name.split(".", 1)
        s = students[owner][pname]
        used = s.grad != 0 if s.grad is not None else torch.zeros_like(s, dtype=torch.bool)
        # hidden units can be dead on 8 images, but a path uses whole input columns
        if owner == "projector":
            used = (used.any(0, keepdim=True).expand_as(s) if pname == "fc1.weight"
                    else torch.ones_like(used))
        expected = torch.where(used, m * before[name] + (1 - m) * s, before[name])
        torch.testing.assert_close(t, expected, rtol=1e-6, atol=1e-7, msg=name)
        assert torch.equal(t[~used], before[name][~used]), name  # untouched means bit-for-bit
        moved += int(used.sum())
    assert moved > 0
    # Π-NAS never uses it
    assert torch.equal(st.mean_teacher["net"].fc.weight, before["net.fc.weight"])


def test_queue_is_a_fixed_size_fifo():
    q = train_stages.NegativeQueue(5, 2, "cpu", seed=0)
    assert q.vectors.shape == (5, 2) and q.fill == 0
    keys = torch.arange(16.0).view(8, 2)
    q.push(keys[:3])
    assert q.fill == 3 and torch.equal(q.vectors[:3], keys[:3])
    q.push(keys[3:7])  # wraps: the two oldest (0, 1) are overwritten by 5, 6
    assert q.fill == 5 and q.vectors.shape == (5, 2)
    assert torch.equal(q.vectors, keys[[5, 6, 2, 3, 4]])
    q.push(keys)  # more keys than places: the newest five stay
    assert sorted(q.vectors[:, 0].tolist()) == keys[3:, 0].tolist()


class NoLabels:
    """The real data, but labels that break any loss they reach."""

    def __init__(self, data):
        self.data, self.train_size = data, data.train_size

    def train_batch(self, key, step, batch_size, part=(0, 1)):
        x, y = self.data.train_batch(key, step, batch_size, part)
        return x, torch.full(y.shape, float("nan"))


def test_no_label_reaches_the_loss(micro_data):
    st = pinas_state()
    phase = st.phases()[0]
    archs, losses = train_stages.train_step(st, phase, NoLabels(micro_data), key=1, distiller=None)
    assert len(archs) == 2 and torch.isfinite(losses[0])
    assert st.queue.fill == PINAS.batch_size


def test_a_few_steps_lower_the_infonce_loss_on_real_images(micro_data):
    st = pinas_state(replace(PINAS, queue_size=256))
    start = pinas_state(replace(PINAS, queue_size=256))  # the same initial weights, kept
    phase = st.phases()[0]
    opt = train_stages.make_optimizer(train_stages.trainable(st, phase), 0.05)
    for step in range(10):
        st.step = step
        x, _ = micro_data.train_batch(7, step, 32)
        opt.zero_grad()
        archs, _ = train_stages.pinas_step(st, phase, x)
        opt.step()
        train_stages.update_mean_teacher(st, archs)
    assert st.queue.fill == 256  # only real keys as negatives now

    a, b = train_stages.sample_path_pair(random.Random(5))
    x, _ = micro_data.train_batch(99, 0, 64)  # images the steps did not see
    views = train_stages.contrastive_views(x, 4, torch.Generator().manual_seed(0))
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(1))

    def loss(state):
        with torch.no_grad():
            ka = train_stages.teacher_embed(state, views[1], a, perm)
            kb = train_stages.teacher_embed(state, views[3], b, perm)
            qa = state.projector(state.net.features(views[0], a))
            qb = state.projector(state.net.features(views[2], b))
            return float(train_stages.info_nce(qa, kb, st.queue.vectors)
                         + train_stages.info_nce(qb, ka, st.queue.vectors)) / 2

    assert loss(st) < loss(start) - 0.1


def test_resume_restores_teacher_and_queue_exactly(tmp_path, micro_data):
    whole = train_stages.train(train_stages.new_state(PINAS, ("pinas",), 0, "cpu"), micro_data,
                               None, train_stages.EventLog(None))
    cut = train_stages.new_state(PINAS, ("pinas",), 0, "cpu")
    events = []

    def log(event, **fields):  # a real Ctrl-C after step 3, handled by the training loop
        events.append({"event": event, **fields})
        if event == "progress" and fields["step"] == 3:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(train_stages.Stopped):
        train_stages.train(cut, micro_data, tmp_path, log)
    assert 0 < cut.queue.fill < PINAS.queue_size  # the queue is partly real keys: its state matters
    resumed = train_stages.new_state(PINAS, ("pinas",), 0, "cpu")
    train_stages.load_checkpoint(resumed, tmp_path / "checkpoints" / "last.pt")
    assert resumed.step == 3
    for mine, theirs in [(resumed.mean_teacher, cut.mean_teacher),
                         (resumed.projector, cut.projector), (resumed.net, cut.net)]:
        for (k, v), w in zip(mine.state_dict().items(), theirs.state_dict().values()):
            assert torch.equal(v, w), k
    assert torch.equal(resumed.queue.vectors, cut.queue.vectors)
    assert (resumed.queue.ptr, resumed.queue.fill) == (cut.queue.ptr, cut.queue.fill)

    train_stages.train(resumed, micro_data, tmp_path, train_stages.EventLog(None))
    for k, v in whole.net.state_dict().items():
        assert torch.equal(v, resumed.net.state_dict()[k]), k
    assert resumed.mean_teacher is None and resumed.queue is None  # dropped once the stage is over
    progress = [e for e in events if e["event"] == "progress"]
    assert [e["queue_fill"] for e in progress] == [min(1.0, i * PINAS.batch_size / PINAS.queue_size)
                                                   for i in range(1, 4)]
    assert all(e["ema_momentum"] == train_stages.PINAS_MOMENTUM for e in progress)
    json.dumps(events)  # the log holds plain JSON values


def test_linear_head_trains_only_the_classifier(micro_data):
    st = train_stages.new_state(PINAS, ("linear_head",), 0, "cpu")
    before = {k: v.clone() for k, v in st.net.named_parameters()}
    buffers = {k: v.clone() for k, v in st.net.named_buffers() if "running" in k}
    train_stages.train(st, micro_data, None, train_stages.EventLog(None))
    for k, v in st.net.named_parameters():
        assert torch.equal(v, before[k]) != k.startswith("fc."), k
    # the features are frozen with their BN statistics: the running ones do not move
    for k, v in st.net.named_buffers():
        if "running" in k:
            assert torch.equal(v, buffers[k]), k
    assert all(m.momentum == 0.1 for m in st.net.modules()
               if isinstance(m, torch.nn.BatchNorm2d))
