import os
import sys
from pathlib import Path

# 200 bootstrap resamples instead of 1000, here and in every process a test starts (report.py
# reads it on import): intervals as wide, give or take, at a fifth of the time. The tests check
# how intervals are made and used, not their third decimal.
os.environ["NAS_BOOTSTRAP_RESAMPLES"] = "200"

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402

import data  # noqa: E402
import presets  # noqa: E402

# A preset small enough for unit tests: a few steps per phase on 512 Fashion-MNIST images at
# 14 px (the `small` and `gpu` presets' size: a quarter of 28 px's pixels and seconds).
MICRO = presets.Preset(
    "micro", "fashion-mnist", 14, 1, 10, width_mult=0.125, divisor=2, batch_size=32,
    epoch_scale=0.0125, lr_scale=10, warmup_epochs=0.125, warmup_lr=0.1, train_subset=512,
    eval_subset=256, calib_batches=2, calib_batch_size=64,
    gt_epochs=0.25, gt_lr=0.05, gt_batch_size=32, gt_n=4,
    probe_every=3, probe_calib_batches=1, probe_eval_images=128, log_every=2, checkpoint_every=4)


@pytest.fixture(scope="session")
def micro_data():
    try:  # wherever it is: --data-dir, Debian's package, or torchvision's download into data/
        return data.load_data(MICRO, "cpu")
    except data.DataError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def dry_run(tmp_path_factory, micro_data):
    """bench/gpu_check.sh --dry-run, once a session: every step of the device check on the CPU,
    and so this suite's real end-to-end run of `nas.py all` (the smoke preset; a second `all`
    resumes the same run). Tests that change a run folder copy it first."""
    import subprocess
    from types import SimpleNamespace
    work = tmp_path_factory.mktemp("dry-run")
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", "--out",
                           str(work / "out")], cwd=work, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHON": sys.executable})
    runs = work / "runs"
    return SimpleNamespace(done=done, out=work / "out", runs=runs,
                           run=next(runs.glob("check-smoke-*"), None))
