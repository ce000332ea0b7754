import json
import math
import os
import random
import signal
from dataclasses import replace

import pytest
import torch

import events
import pinas
import train_stages as stages
import supernet
import trainer
from conftest import MICRO

# Π-NAS in about 6 steps: the stage is as long as SPOS (70 paper epochs).
PINAS = replace(MICRO, epoch_scale=0.005, queue_size=128, log_every=1)


def pinas_state(preset=PINAS):
    st = trainer.new_state(preset, ("pinas",), 0, "cpu")
    st.pinas = pinas.PiNAS(st.net, preset.queue_size, st.seed)
    return st


def test_the_two_paths_differ_in_every_choice():
    rng = random.Random(0)
    spaces = [(supernet.DEPTH_RANGES, supernet.WIDTH_CODES),
              (((4, 5), (4, 5), (6, 8), (2, 5)), ((1, 2, 3),) * 4)]
    for depth_ranges, widths in spaces:
        for _ in range(500):
            a, b = pinas.sample_path_pair(rng, depth_ranges, widths)
            for s in range(4):
                assert a.depths[s] != b.depths[s] and a.outs[s] != b.outs[s]
                assert all(x != y for x, y in zip(a.mids[s], b.mids[s]))
                lo, hi = depth_ranges[s]
                for arch in (a, b):
                    assert lo <= arch.depths[s] <= hi
                    assert set(arch.mids[s]) | {arch.outs[s]} <= set(widths[s])
                    assert len(arch.mids[s]) == arch.depths[s]


def test_a_choice_with_one_option_is_shared():
    a, b = pinas.sample_path_pair(random.Random(1), stages.MAX_ONLY,
                                         stages.WIDEST)
    assert a == b == supernet.MAX_ARCH


def test_mean_teacher_moves_exactly_the_used_slices_by_the_ema_rule(micro_data):
    st = pinas_state()
    with torch.no_grad():
        for p in st.pinas.mean_teacher.parameters():
            p.add_(torch.randn_like(p))  # student and teacher now differ everywhere
    a, b = pinas.sample_path_pair(random.Random(3))
    # which weights a path uses, found independently of the code under test: where its gradient is
    # (on 28 px images, so that stage 4 keeps 4 x 4 pixels and no used channel is dead)
    x = torch.nn.functional.interpolate(micro_data.train_batch(0, 0, 8)[0], size=28)
    st.net.zero_grad()
    st.pinas.projector.zero_grad()
    for arch in (a, b):
        st.pinas.projector(st.net.features(x, arch)).sum().backward()
    before = {k: v.clone() for k, v in st.pinas.mean_teacher.state_dict().items()}
    m = 0.9
    st.pinas.update_teacher(st.net, [a, b], momentum=m)
    students = {"net": dict(st.net.named_parameters()),
                "projector": dict(st.pinas.projector.named_parameters())}
    moved = 0
    for name, t in st.pinas.mean_teacher.named_parameters():
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
    assert torch.equal(st.pinas.mean_teacher["net"].fc.weight, before["net.fc.weight"])


def test_queue_is_a_fixed_size_fifo():
    q = pinas.NegativeQueue(5, 2, "cpu", seed=0)
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
        self.mean, self.std = data.mean, data.std

    def train_batch(self, key, step, batch_size, part=(0, 1)):
        x, y = self.data.train_batch(key, step, batch_size, part)
        return x, torch.full(y.shape, float("nan"))


def test_no_label_reaches_the_loss(micro_data):
    st = pinas_state()
    phase = st.phases()[0]
    archs, losses = trainer.train_step(st, phase, NoLabels(micro_data), key=1)
    assert len(archs) == 2 and torch.isfinite(losses[0])
    assert st.pinas.queue.fill == PINAS.batch_size


def test_a_few_steps_lower_the_infonce_loss_on_real_images(micro_data):
    st = pinas_state(replace(PINAS, queue_size=256))
    start = pinas_state(replace(PINAS, queue_size=256))  # the same initial weights, kept
    phase = st.phases()[0]
    stage = stages.STAGES["pinas"]
    opt = trainer.make_optimizer(stage.params(st), 0.05, stage.weight_decay)
    for step in range(10):
        st.step = step
        x, _ = micro_data.train_batch(7, step, 32)
        opt.zero_grad()
        archs, _ = stages.pinas_step(st, phase, x, (micro_data.mean, micro_data.std))
        opt.step()
        st.pinas.update_teacher(st.net, archs)
    assert st.pinas.queue.fill == 256  # only real keys as negatives now

    a, b = pinas.sample_path_pair(random.Random(5))
    x, _ = micro_data.train_batch(99, 0, 64)  # images the steps did not see
    views = pinas.contrastive_views(x, (micro_data.mean, micro_data.std), 4,
                                     torch.Generator().manual_seed(0))
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(1))

    def loss(state):
        with torch.no_grad():
            ka = state.pinas.teacher_keys(views[1], a, perm)
            kb = state.pinas.teacher_keys(views[3], b, perm)
            qa = state.pinas.projector(state.net.features(views[0], a))
            qb = state.pinas.projector(state.net.features(views[2], b))
            return float(pinas.info_nce(qa, kb, st.pinas.queue.vectors)
                         + pinas.info_nce(qb, ka, st.pinas.queue.vectors)) / 2

    assert loss(st) < loss(start) - 0.1


def test_resume_restores_teacher_and_queue_exactly(tmp_path, micro_data):
    whole = trainer.train(trainer.new_state(PINAS, ("pinas",), 0, "cpu"), micro_data,
                               None, events.EventLog(None))
    cut = trainer.new_state(PINAS, ("pinas",), 0, "cpu")
    logged = []

    def log(event, **fields):  # a real Ctrl-C after step 3, handled by the training loop
        logged.append({"event": event, **fields})
        if event == "progress" and fields["step"] == 3:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(trainer.Stopped):
        trainer.train(cut, micro_data, tmp_path, log)
    assert 0 < cut.pinas.queue.fill < PINAS.queue_size  # partly real keys: its state matters
    resumed = trainer.new_state(PINAS, ("pinas",), 0, "cpu")
    trainer.load_checkpoint(resumed, tmp_path / "checkpoints" / "last.pt")
    assert resumed.step == 3
    for mine, theirs in [(resumed.pinas.mean_teacher, cut.pinas.mean_teacher),
                         (resumed.pinas.projector, cut.pinas.projector), (resumed.net, cut.net)]:
        for (k, v), w in zip(mine.state_dict().items(), theirs.state_dict().values()):
            assert torch.equal(v, w), k
    assert torch.equal(resumed.pinas.queue.vectors, cut.pinas.queue.vectors)
    assert ((resumed.pinas.queue.ptr, resumed.pinas.queue.fill)
            == (cut.pinas.queue.ptr, cut.pinas.queue.fill))

    trainer.train(resumed, micro_data, tmp_path, events.EventLog(None))
    for k, v in whole.net.state_dict().items():
        assert torch.equal(v, resumed.net.state_dict()[k]), k
    assert resumed.pinas is None  # teacher and queue are dropped once the stage is over
    progress = [e for e in logged if e["event"] == "progress"]
    assert [e["queue_fill"] for e in progress] == [min(1.0, i * PINAS.batch_size / PINAS.queue_size)
                                                   for i in range(1, 4)]
    assert all(e["ema_momentum"] == pinas.MOMENTUM for e in progress)
    json.dumps(logged)  # the log holds plain JSON values


def test_linear_head_trains_only_the_classifier(micro_data):
    st = trainer.new_state(PINAS, ("linear_head",), 0, "cpu")
    before = {k: v.clone() for k, v in st.net.named_parameters()}
    buffers = {k: v.clone() for k, v in st.net.named_buffers() if "running" in k}
    trainer.train(st, micro_data, None, events.EventLog(None))
    for k, v in st.net.named_parameters():
        assert torch.equal(v, before[k]) != k.startswith("fc."), k
    # the features are frozen with their BN statistics: the running ones do not move
    for k, v in st.net.named_buffers():
        if "running" in k:
            assert torch.equal(v, buffers[k]), k
    assert all(m.momentum == 0.1 for m in st.net.modules()
               if isinstance(m, torch.nn.BatchNorm2d))


def test_colour_jitter_and_blur_equal_torchvisions_per_image():
    import torchvision.transforms.v2.functional as TF
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 12, 12, generator=g)
    factors = torch.empty(6, 3).uniform_(0.6, 1.4, generator=g)
    hue = torch.empty(6).uniform_(-0.4, 0.4, generator=g)
    order = torch.rand(6, 4, generator=g).argsort(1)
    got = pinas.color_jitter(x, factors, hue, order)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for i in range(6):
        want = x[i]
        for j in order[i].tolist():
            f = float(hue[i]) if j == 3 else float(factors[i, j])
            want = ops[j](want, f)
        torch.testing.assert_close(got[i], want, atol=2e-6, rtol=0)
    sigma = torch.tensor([0.0, 0.3, 0.7, 1.0, 0.5, 0.0])
    blurred = pinas.gaussian_blur(x, sigma)
    radius = max(1, math.ceil(3 * pinas.BLUR_SIGMA[1] * 12 / 224))
    for i in range(6):
        want = x[i] if sigma[i] == 0 else TF.gaussian_blur(x[i], [2 * radius + 1] * 2,
                                                          [float(sigma[i])] * 2)
        torch.testing.assert_close(blurred[i], want, atol=1e-6, rtol=0)
    assert not torch.equal(blurred[3], x[3])


def test_views_of_grey_images_use_only_what_grey_images_have(micro_data):
    """Fashion-MNIST: saturation, hue and grayscale do nothing to one channel; brightness,
    contrast and the crop still make the four views differ, and a view's pixels stay in the
    image's range."""
    x, _ = micro_data.train_batch(3, 0, 16)
    one = torch.rand(4, 1, 8, 8)
    assert torch.equal(pinas.color_jitter(one, torch.ones(4, 3), torch.full((4,), 0.3),
                                          torch.arange(4).repeat(4, 1)), one)
    views = pinas.contrastive_views(x, (micro_data.mean, micro_data.std), 4,
                                    torch.Generator().manual_seed(0))
    pixels = [v * micro_data.std + micro_data.mean for v in views]
    assert all(p.min() >= -1e-5 and p.max() <= 1 + 1e-5 for p in pixels)
    assert all(not torch.allclose(views[0], v) for v in views[1:])


def test_the_loss_sums_both_paths_and_the_queue_takes_the_mean_key(micro_data, monkeypatch):
    """Π-NAS's code: loss = InfoNCE(q_a, k_b) + InfoNCE(q_b, k_a), and the queue receives
    (k_a + k_b) / 2 as it is, not renormalised."""
    st = pinas_state()
    terms, pushed = [], []
    real = pinas.info_nce
    monkeypatch.setattr(pinas, "info_nce", lambda q, k, n: terms.append(real(q, k, n))
                        or terms[-1])
    keys = []
    real_keys = st.pinas.teacher_keys
    monkeypatch.setattr(st.pinas, "teacher_keys", lambda *a: keys.append(real_keys(*a))
                        or keys[-1])
    monkeypatch.setattr(st.pinas.queue, "push", lambda k: pushed.append(k))
    x, _ = micro_data.train_batch(0, 0, 16)
    _, (loss,) = st.pinas.step(st.net, x, (micro_data.mean, micro_data.std),
                               random.Random(0), torch.Generator().manual_seed(0))
    assert len(terms) == 2 and torch.equal(loss, (terms[0] + terms[1]).detach())
    assert torch.equal(pushed[0], (keys[0] + keys[1]) / 2)
    assert pushed[0].norm(dim=1).max() < 1 - 1e-3  # two unit vectors' mean is shorter


def test_the_trainer_gives_pinas_its_codes_optimizer_and_the_head_the_papers(monkeypatch,
                                                                             micro_data):
    """SGD at lr 0.03 per 192 images with weight decay 1e-4 for Π-NAS (its code's), the
    supervised stages' 3e-5 for the linear head after it."""
    made, real = [], trainer.make_optimizer
    monkeypatch.setattr(trainer, "make_optimizer",
                        lambda params, lr, wd=3e-5: made.append((lr, wd)) or real(params, lr, wd))
    trainer.train(trainer.new_state(PINAS, ("pinas", "linear_head"), 0, "cpu"), micro_data, None,
                  events.EventLog(None))
    assert made == [(pytest.approx(0.03 * PINAS.batch_size / 192), 1e-4),
                    (stages.LINEAR_HEAD_LR, 3e-5)]
