"""The CUDA path: bf16 autocast, channels_last, fp32 logits, no host syncs in the copies.

Every test runs twice: on "cuda" (skipped without a GPU; bench/gpu_check.sh runs this file
first on the device machine) and on "cpu-bf16", the same code path on the CPU
(presets.CUDA_PATH_ON_CPU: bf16 autocast and channels_last there too), so that a dtype or a
layout mistake of the GPU path fails here, in CI, before any GPU is lent.
"""

import random
from contextlib import nullcontext
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import data
import evaluate
import events
import presets
import search
import supernet
import trainer
from conftest import MICRO

# One step a phase: the warm-up and the paper's stages, Π-NAS and its head; sse4 apart (a run
# takes one SSE split).
ONE_STEP = replace(MICRO, epoch_scale=0.001, warmup_epochs=0.01, queue_size=64, log_every=1,
                   probe_every=0)
RUNS = [("warmup", "spos", "ps_depth", "ps_width", "aps_depth", "aps_width", "cpt", "sse34"),
        ("warmup", "cpt", "sse4"), ("pinas", "linear_head")]
# bf16 has 8 bits of mantissa: the supernet's sliced weights and the static net's contiguous
# copies run other kernels, whose bf16 roundings differ by a few parts in a hundred of a logit
BF16_LOGITS = {"rtol": 0.05, "atol": 0.05}


@pytest.fixture(params=["cuda", "cpu-bf16"])
def device(request, monkeypatch):
    if request.param == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device")
        return "cuda"
    monkeypatch.setattr(presets, "CUDA_PATH_ON_CPU", True)
    return "cpu"


@pytest.fixture
def images(device):
    try:
        return data.load_data(MICRO, device, channels_last=presets.channels_last(device))
    except data.DataError as e:
        pytest.skip(str(e))


def test_the_path_under_test_is_bf16_and_channels_last(device, images):
    assert presets.amp_dtype(device) == (torch.bfloat16 if device == "cpu"
                                         or torch.cuda.is_bf16_supported() else None)
    x, _ = images.train_batch(0, 0, 8)
    assert x.is_contiguous(memory_format=torch.channels_last)
    st = trainer.new_state(MICRO, ("warmup",), 0, device)
    assert st.net.stem.weight.is_contiguous(memory_format=torch.channels_last)
    with presets.autocast(device):
        logits = st.net(x, supernet.MAX_ARCH)
    assert logits.dtype == torch.float32  # the classifier runs in fp32 under autocast


@pytest.mark.parametrize("stages", RUNS, ids=["supervised+sse34", "sse4", "pinas"])
def test_one_step_of_every_stage(device, images, stages):
    if device == "cpu":  # SPOS's and PS's step is APS's (sampled_step): emulated bf16 is slow
        stages = tuple(s for s in stages if s not in ("spos", "ps_depth", "ps_width"))
    log = events.EventLog(None)
    st = trainer.train(trainer.new_state(ONE_STEP, stages, 0, device), images, None, log,
                       None, evaluate.make_scorer(ONE_STEP, images))
    assert st.phase_index == len(st.phases())
    assert all(torch.isfinite(p).all() for p in st.net.parameters())
    assert st.net.fc.weight.device.type == torch.device(device).type


def test_the_supernet_equals_its_extracted_static_net(device, images):
    st = trainer.new_state(MICRO, ("warmup",), 0, device)
    calib = images.calib_batches(2, 64, seed=0)
    x, _ = images.eval_batches(64)[0]
    for seed in range(3):
        arch = supernet.sample_arch(random.Random(seed))
        evaluate.calibrate_bn(st.net, arch, calib)
        static = supernet.extract_subnet(st.net, arch).eval()
        if presets.channels_last(device):
            static = static.to(memory_format=torch.channels_last)
        with torch.no_grad(), presets.autocast(device):
            ours, theirs = st.net.eval()(x, arch), static(x)
        torch.testing.assert_close(ours, theirs, **BF16_LOGITS)
        assert (ours.argmax(1) == theirs.argmax(1)).float().mean() >= 0.95


def test_bn_recalibration_is_the_exact_mean_in_fp32(device, images, monkeypatch):
    if device == "cpu":  # without autocast the emulated path is the plain CPU one: test_evaluate's
        pytest.skip("on the CPU this is tests/test_evaluate.py's exact-mean test")
    monkeypatch.setattr(evaluate, "autocast", lambda d: nullcontext())  # fp32 throughout
    torch.manual_seed(0)
    net = supernet.Supernet(MICRO.shape).to(device)
    arch = supernet.sample_arch(random.Random(3))
    batches = images.calib_batches(3, 32, seed=0)
    evaluate.calibrate_bn(net, arch, batches)
    c = MICRO.shape.ch(supernet.STEM_BASE, arch.stem)
    outs = [F.conv2d(x, net.stem.weight[:c], padding=1) for x in batches]
    means = torch.stack([o.mean((0, 2, 3)) for o in outs]).mean(0)
    varis = torch.stack([o.transpose(0, 1).flatten(1).var(1) for o in outs]).mean(0)
    torch.testing.assert_close(net.stem.bn.running_mean[:c], means, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(net.stem.bn.running_var[:c], varis, rtol=1e-4, atol=1e-5)


def test_export_of_a_subnet_trained_on_this_device(device, images, tmp_path):
    if device == "cpu":
        pytest.skip("export from the CPU is tests/test_search.py's")
    st = trainer.train(trainer.new_state(ONE_STEP, ("warmup", "cpt", "sse34"), 0, device),
                       images, None, events.EventLog(None))
    arch = supernet.sample_arch(random.Random(7))
    calib = images.calib_batches(2, 64, seed=0)
    net = search.inherited_subnet(st, arch, calib)
    with torch.no_grad():
        expected = net(images.eval_batches(4)[0][0]).float().cpu()
    _, program = search.save_export(tmp_path / "net.pt", net, MICRO, images.mean, images.std)
    x = images.test_x[:4].float().div(255).cpu()
    logits = torch.export.load(program).module()(x)
    torch.testing.assert_close(logits, expected, **BF16_LOGITS)
