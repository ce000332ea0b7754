"""What tests/test_parallel.py runs alone and under `torchrun --nproc_per_node=2` (gloo, CPU).

    python tests/parallel_worker.py OUT first [WEIGHTS] | resume

`first`: every check below, each rank writing what it ends with to OUT/first-rank<r>.pt, then
supernet training that rank 1 kills (SIGKILL) in the middle of CPT, as a crash would. Alone,
nothing is killed and the training runs to its end. The archs are evaluated with a warm-up's
weights: alone, it trains them and keeps them in OUT/warm.pt; given WEIGHTS, it loads those,
so that 1 and 2 processes evaluate the same net.
`resume`: that training resumed from its last checkpoint and run to the end (OUT/resume-...).
"""

import os
import signal
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import data  # noqa: E402
import evaluate  # noqa: E402
import groundtruth  # noqa: E402
import parallel  # noqa: E402
import train_stages as stages  # noqa: E402
import supernet  # noqa: E402
import trainer  # noqa: E402
from conftest import MICRO  # noqa: E402


STAGES = ("warmup", "cpt", "sse4")  # the pool, the split and KD (SSE4: SSE34's code, 2 phases)
KILL_AT = (1, 5)  # (phase index, step): CPT's sixth step, one after the checkpoint at step 4
ARCHS = groundtruth.pick_archs(4, 3, MICRO)


def quiet(event, **fields):
    return fields


def record_archs(into: list, kill: bool):
    """train_step, noting the codes each step trains; rank 1 dies at KILL_AT when `kill`."""
    step = trainer.train_step

    def recording(st, phase, batches, key):
        if kill and parallel.rank() == 1 and (st.phase_index, st.step) == KILL_AT:
            os.kill(os.getpid(), signal.SIGKILL)
        archs, losses = step(st, phase, batches, key)
        into.append([st.phase_index, st.step, [supernet.encode(a) for a in archs]])
        return archs, losses
    trainer.train_step = recording


def step_with_fixed_bn_statistics(images, warm: dict) -> dict:
    """One PS step (4 paths) from the warm-up's weights with BN normalizing by fixed
    statistics (the full net's, calibrated): each image's gradient then depends on no other
    image, so 2 ranks' averaged gradients are 1 rank's, up to the order of float sums. One
    step, because training is chaotic: a 3e-8 difference after one step is 3e-3 after four.
    A small lr: BN without batch statistics lets a larger one blow up."""
    st = trainer.new_state(MICRO, ("ps_depth",), 0, "cpu")
    st.net.load_state_dict(warm)
    evaluate.calibrate_bn(st.net, supernet.MAX_ARCH, images.calib_batches(2, 64, 0))
    phase = st.phases()[0]
    st.optimizer = trainer.make_optimizer(stages.STAGES["ps_depth"].params(st), 0.002)
    st.net.eval()
    trainer.train_step(st, phase, images, 1)
    parallel.average_gradients(stages.STAGES["ps_depth"].params(st))
    st.optimizer.step()
    return st.net.state_dict()


def pinas_state(images) -> dict:
    """Π-NAS's student, mean teacher and queue after its stage's first steps."""
    st = trainer.new_state(replace(MICRO, queue_size=64), ("pinas",), 0, "cpu")
    phase, stage = st.phases()[0], stages.STAGES["pinas"]
    stage.begin(st, phase, quiet, None)
    st.optimizer = trainer.make_optimizer(stage.params(st), phase.lr, stage.weight_decay)
    for step in range(3):
        st.step = step
        st.optimizer.zero_grad(set_to_none=True)
        archs, _ = trainer.train_step(st, phase, images, 1)
        parallel.average_gradients(stage.params(st))
        st.optimizer.step()
        stage.after_step(st, archs)
    return {"net": st.net.state_dict(), "teacher": st.pinas.mean_teacher.state_dict(),
            "queue": st.pinas.queue.vectors.clone()}


def warm_state(images, weights: Path | None, out: Path) -> trainer.TrainState:
    st = trainer.new_state(MICRO, ("warmup",), 0, "cpu")
    if weights is None:
        trainer.train(st, images, None, quiet)
        torch.save(st.net.state_dict(), out / "warm.pt")
    else:
        st.net.load_state_dict(torch.load(weights))
    return st


def main(out: Path, mode: str, weights: Path | None) -> None:
    torch.set_num_threads(1)
    parallel.start("cpu")
    images = data.load_data(MICRO, "cpu")
    result = {"world_size": parallel.world_size()}
    if mode == "first":
        st = warm_state(images, weights, out)
        result["accs"] = evaluate.evaluate_run(st, images, ARCHS, quiet)
        result["warm"] = st.net.state_dict()
        result["fixed_bn_step"] = step_with_fixed_bn_statistics(images, result["warm"])
        result["pinas"] = pinas_state(images)
        gt = groundtruth.GroundTruth(out / f"gt-{parallel.world_size()}.json")
        result["truth"], _ = groundtruth.ground_truth(gt, ARCHS, 2, MICRO, images, quiet)
        torch.save(result, out / f"first-rank{parallel.rank()}.pt")
    result["archs"] = []
    record_archs(result["archs"], kill=mode == "first")
    st = trainer.new_state(MICRO, STAGES, 0, "cpu")
    run = out / f"run-{parallel.world_size()}"
    if mode == "resume":
        trainer.load_checkpoint(st, trainer.last_checkpoint(run))
    trainer.train(st, images, run, quiet, score=evaluate.make_scorer(MICRO, images))
    result["trained"] = st.net.state_dict()
    result["finished"] = st.phase_index == len(st.phases())
    torch.save(result, out / f"{mode}-rank{parallel.rank()}.pt")
    parallel.stop()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]) if len(sys.argv) > 3 else None)
