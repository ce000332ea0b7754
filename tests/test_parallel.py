"""More than one process: 2 gloo ranks under torchrun on CPU against 1 process.

One module-wide fixture makes three launches of tests/parallel_worker.py (30-40 s in all):
alone; under torchrun with 2 ranks, where rank 1 kills itself in the middle of training;
and under torchrun again, resuming that training. The tests read what each rank left.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import nas
import parallel

WORKER = Path(__file__).resolve().parent / "parallel_worker.py"


def launch(out: Path, *args: str, ranks: int = 1) -> subprocess.CompletedProcess:
    head = [sys.executable]
    if ranks > 1:
        head += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*head, str(WORKER), str(out), *args], env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, micro_data):
    alone, two = tmp_path_factory.mktemp("alone"), tmp_path_factory.mktemp("two")
    assert launch(alone, "first").returncode == 0
    killed = launch(two, "first", str(alone / "warm.pt"), ranks=2)
    resumed = launch(two, "resume", ranks=2)

    def load(folder, name):
        return torch.load(folder / name, weights_only=False)
    return {"alone": load(alone, "first-rank0.pt"), "killed": killed, "resumed": resumed,
            "first": [load(two, f"first-rank{r}.pt") for r in (0, 1)],
            "resume": [load(two, f"resume-rank{r}.pt") for r in (0, 1)], "two": two}


def same(a: dict, b: dict, keys=None) -> bool:
    return all(torch.equal(a[k], b[k]) for k in (keys or a))


def test_a_killed_two_rank_run_resumes_and_finishes(runs):
    assert runs["killed"].returncode != 0  # rank 1 died, and torchrun stopped rank 0
    assert runs["resumed"].returncode == 0, runs["resumed"].stderr[-2000:]
    assert [r["world_size"] for r in runs["resume"]] == [2, 2]
    assert all(r["finished"] for r in runs["resume"])


def test_every_rank_ends_with_the_same_supernet_and_trained_the_archs_one_process_does(runs):
    first, second = runs["resume"]
    assert same(first["trained"], second["trained"])  # weights and BN statistics, bit for bit
    assert first["archs"] == second["archs"]
    # The resumed part repeats the steps after the last checkpoint (CPT's step 4) and goes on
    # to the end: the same archs, in the same order, as the uninterrupted single process.
    alone = runs["alone"]["archs"]
    assert first["archs"][0][:2] == [1, 4]
    assert first["archs"] == alone[-len(first["archs"]):]
    assert len({code for _, _, codes in alone for code in codes}) > 10  # the archs vary


def test_two_ranks_step_as_one_rank_when_bn_statistics_are_fixed(runs):
    """BN with batch statistics normalizes each rank's half apart, so 2 ranks train another
    net than 1; with fixed statistics the averaged gradient is the whole batch's."""
    alone, (first, second) = runs["alone"], runs["first"]
    assert same(first["fixed_bn_step"], second["fixed_bn_step"])
    moved = max((alone["fixed_bn_step"][k] - alone["warm"][k]).abs().max()
                for k in alone["warm"] if alone["warm"][k].is_floating_point())
    apart = max((first["fixed_bn_step"][k] - alone["fixed_bn_step"][k]).abs().max()
                for k in alone["warm"] if alone["warm"][k].is_floating_point())
    assert moved > 1e-3
    assert apart < 1e-6  # the same sums, added in another order


def test_pinas_teacher_and_queue_are_the_same_on_every_rank(runs):
    first, second = (r["pinas"] for r in runs["first"])
    params = [k for k in first["net"] if "running" not in k and "num_batches" not in k]
    assert same(first["net"], second["net"], params)
    assert same(first["teacher"], second["teacher"],
                [k for k in first["teacher"] if "running" not in k and "num_batches" not in k])
    assert torch.equal(first["queue"], second["queue"])


def test_ground_truth_split_by_arch_equals_one_process_and_meets_in_one_file(runs):
    alone, (first, second) = runs["alone"], runs["first"]
    assert first["truth"] == second["truth"] == alone["truth"]
    assert len(set(alone["truth"].values())) > 1
    entries = json.loads((runs["two"] / "gt-2.json").read_text())["entries"]
    assert len(entries) == 8  # 4 archs x 2 seeds, from both ranks
    assert not list(runs["two"].glob("gt-2.rank*.json"))


def test_evaluation_split_by_arch_equals_one_process(runs):
    alone, (first, second) = runs["alone"], runs["first"]
    assert first["accs"] == second["accs"] == alone["accs"]
    assert list(first["accs"]) == list(alone["accs"])  # in the order asked for
    assert len(set(alone["accs"].values())) > 1


def test_more_processes_than_archs_or_an_uneven_batch_is_refused(monkeypatch, capsys):
    monkeypatch.setattr(parallel, "world_size", lambda: 4)
    for kwargs, words in (({"archs": 3}, "4 processes for 3 archs"),
                          ({"batch_size": 30}, "batch of 30 cannot be split evenly over 4")):
        with pytest.raises(nas.typer.Exit) as e:
            nas.check_split(**kwargs)
        assert e.value.exit_code == 2
        assert words in capsys.readouterr().err


def test_archs_that_differ_between_ranks_stop_the_run_naming_the_ranks(monkeypatch):
    import train_stages as stages
    import supernet
    import trainer
    from presets import PRESETS, TrainingError
    seen = []

    def differing(text):
        seen.append(text)
        return [1]
    monkeypatch.setattr(parallel, "differing_ranks", differing)
    monkeypatch.setattr(parallel, "world_size", lambda: 2)
    phase = stages.stage_phases("spos", PRESETS["tiny"])[0]
    pending = [([supernet.MAX_ARCH], torch.zeros(1))]
    with pytest.raises(TrainingError, match=r"ranks \[1\] sampled other archs"):
        trainer.check_same_archs(pending, phase, 10)
    assert seen == [supernet.encode(supernet.MAX_ARCH)]
