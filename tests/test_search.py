import json
import random
import subprocess
import sys

import pytest
import torch

import evaluate
import events
import groundtruth
import search
import supernet
import trainer
from conftest import MICRO


def target_fitness(target):
    """A fitness with a known optimum: the closer (Eq. 2) to `target`, the better."""
    calls = []

    def fitness(archs):
        calls.extend(archs)
        return {supernet.encode(a): -supernet.distance(a, target) for a in archs}
    return fitness, calls


def test_mutation_and_crossover_give_valid_archs():
    rng = random.Random(0)
    archs = [supernet.sample_arch(rng) for _ in range(50)]
    for a, b in zip(archs, archs[1:]):
        for child in (search.mutate(a, rng, p=0.5), search.crossover(a, b, rng)):
            assert supernet.decode(supernet.encode(child)) == child


def test_search_never_evaluates_an_arch_over_budget():
    budget = search.Budget(flops=4.5e9)
    fitness, calls = target_fitness(supernet.decode(supernet.MAX_CODE))  # pulls toward large archs
    admits = lambda a: search.challenge_size(a)[0] <= budget.flops
    scores = search.evolve(fitness, admits, population=8, generations=3, seed=0)
    assert calls and all(search.challenge_size(a)[0] <= budget.flops for a in calls)
    assert len(scores) == len(set(calls))


def test_evolution_beats_as_many_uniform_samples_under_the_same_budget():
    rng = random.Random(1)
    target = supernet.sample_arch(rng)
    admits = lambda a: search.challenge_size(a)[0] <= 5.0e9
    fitness, calls = target_fitness(target)
    evolved = search.evolve(fitness, admits, population=10, generations=6, seed=3)
    uniform = search.sample_within(random.Random(3), len(evolved), admits)
    assert max(evolved.values()) >= max(fitness(uniform).values())


def test_pareto_front_keeps_only_undominated_points():
    points = [{"flops": 1, "top1": 0.5}, {"flops": 2, "top1": 0.4}, {"flops": 3, "top1": 0.7},
              {"flops": 3, "top1": 0.6}, {"flops": 4, "top1": 0.7}]
    assert search.pareto_front(points) == [points[0], points[2]]


@pytest.fixture(scope="module")
def trained(micro_data, tmp_path_factory):
    st = trainer.new_state(MICRO, ("warmup", "aps_depth", "cpt", "sse34"), 0, "cpu")
    trainer.train(st, micro_data, None, events.EventLog(None))
    return st, tmp_path_factory.mktemp("run")


def test_a_second_search_reevaluates_nothing_and_files_are_written(trained, micro_data):
    st, run_dir = trained
    budget = search.Budget(flops=5.0e9)
    first = search.run_search(st, micro_data, run_dir, budget, 6, 2, 0, lambda *a, **k: None)
    records = [json.loads(line) for line in (run_dir / "search.jsonl").read_text().splitlines()]
    # every arch is in the log; a code that builds a net already scored is not evaluated again
    twins = sum("same_net_as" in r for r in records)
    assert first["evaluated_now"] == first["evaluated"] - twins > 0
    assert first["best"]["flops"] <= budget.flops
    second = search.run_search(st, micro_data, run_dir, budget, 6, 2, 0, lambda *a, **k: None)
    assert second["evaluated_now"] == 0 and second["best"] == first["best"]
    assert json.loads((run_dir / "search.json").read_text())["best"] == first["best"]
    assert (run_dir / "search.png").read_bytes()[:4] == b"\x89PNG"
    lines = (run_dir / "search.jsonl").read_text().splitlines()
    assert len(lines) == first["evaluated"]
    # the fitness is the evaluation's: the same top-1 as evaluate_archs for that arch
    arch = supernet.decode(first["best"]["arch"])
    calib = micro_data.calib_batches(MICRO.calib_batches, MICRO.calib_batch_size, seed=0)
    evals = micro_data.eval_batches(MICRO.eval_subset)
    accs = evaluate.evaluate_archs(st.net, st.sse, [arch], calib, evals)
    assert accs[first["best"]["arch"]] == first["best"]["top1"]


def test_an_evaluation_that_fails_leaves_the_supernet_with_the_weights_it_held(trained,
                                                                               micro_data):
    st, _ = trained
    held = st.sse.current
    before = {k: v.clone() for k, v in st.net.state_dict().items()}
    rng = random.Random(11)
    others = [a for a in (supernet.sample_arch(rng) for _ in range(200))
              if st.sse.owner(a) != held]
    archs = [next(a for a in others if st.sse.owner(a) == sub) for sub in (0, 1)]
    calib = micro_data.calib_batches(MICRO.calib_batches, MICRO.calib_batch_size, seed=0)
    x, y = micro_data.eval_batches(64)[0]
    broken = [(x, y[:-1])]  # one label short: accuracy raises inside the first copy's `with`
    with pytest.raises(RuntimeError):
        evaluate.evaluate_archs(st.net, st.sse, archs, calib, broken)
    assert st.sse.current == held
    for k, v in st.net.state_dict().items():
        assert torch.equal(v, before[k]), k
    # one that succeeds leaves every copy's BN statistics as they were too
    copies = {sub: {k: v.clone() for k, v in w.items()} for sub, w in st.sse.weights.items()
              if w is not None and sub != held}
    evaluate.evaluate_archs(st.net, st.sse, archs, calib, micro_data.eval_batches(64))
    assert copies and st.sse.current == held
    for sub, w in copies.items():
        for k, v in w.items():
            assert torch.equal(st.sse.weights[sub][k], v), (sub, k)
    for k, v in st.net.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_exported_program_gives_the_supernets_logits_without_the_project(trained, micro_data,
                                                                       tmp_path):
    st, _ = trained
    arch = supernet.sample_arch(random.Random(7))
    calib = micro_data.calib_batches(MICRO.calib_batches, MICRO.calib_batch_size, seed=0)
    net = search.inherited_subnet(st, arch, calib)
    out, program = search.save_export(tmp_path / "net.pt", net, MICRO, micro_data.mean,
                                      micro_data.std)
    size = MICRO.image_size
    images = torch.rand(5, 1, size, size)
    torch.save(images, tmp_path / "x.pt")
    # the supernet itself, with the owner's weights and this arch's recalibrated BN statistics
    with st.sse.holding(st.net, st.sse.owner(arch)), torch.no_grad():
        evaluate.calibrate_bn(st.net, arch, calib)
        expected = st.net((images - micro_data.mean) / micro_data.std, arch)
    code = ("import torch\n"
            "try:\n    import supernet\n    raise SystemExit('the project is importable')\n"
            "except ImportError:\n    pass\n"
            f"m = torch.export.load({str(program)!r}).module()\n"
            f"torch.save(m(torch.load({str(tmp_path / 'x.pt')!r})), {str(tmp_path / 'y.pt')!r})\n")
    subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, check=True)
    logits = torch.load(tmp_path / "y.pt")
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    assert search.load_export(out)(torch.zeros(1, 1, size, size)).shape == (1, 10)


def test_latency_is_measured_once_per_arch_and_kept(trained, micro_data, tmp_path):
    st, _ = trained
    log = search.SearchLog(tmp_path / "search.jsonl", "w", "cpu-test")
    fitness = search.Fitness(st, micro_data, log)
    arch = supernet.sample_arch(random.Random(2))
    ms = fitness.latency(arch)
    assert ms > 0
    assert fitness.admits(arch, search.Budget(latency_ms=2 * ms))
    assert not fitness.admits(arch, search.Budget(latency_ms=ms / 2))
    again = search.SearchLog(tmp_path / "search.jsonl", "w", "cpu-test")
    assert again.latency == {supernet.encode(arch): ms}
    assert len((tmp_path / "search.jsonl").read_text().splitlines()) == 1


def test_fine_tuning_killed_and_resumed_equals_uninterrupted(micro_data, tmp_path):
    from dataclasses import replace
    preset = replace(MICRO, checkpoint_every=2)
    arch = supernet.sample_arch(random.Random(5))

    def fresh():
        torch.manual_seed(0)
        return supernet.StaticNet(arch, preset.shape)

    whole = fresh()
    top1 = groundtruth.train_static(whole, preset, micro_data, 0, 0.5)

    class Killed:  # the data, with a kill at the fifth batch
        def __getattr__(self, name):
            return getattr(micro_data, name)

        def train_batch(self, key, step, batch_size):
            if step == 4:
                raise KeyboardInterrupt
            return micro_data.train_batch(key, step, batch_size)

    state = tmp_path / "net.pt.finetune"
    with pytest.raises(KeyboardInterrupt):
        groundtruth.train_static(fresh(), preset, Killed(), 0, 0.5, checkpoint=state, what="a")
    assert torch.load(state, weights_only=True)["step"] == 4
    with pytest.raises(ValueError, match="holds another training"):
        groundtruth.train_static(fresh(), preset, micro_data, 1, 0.5, checkpoint=state, what="a")
    resumed = fresh()
    assert groundtruth.train_static(resumed, preset, micro_data, 0, 0.5, checkpoint=state,
                                    what="a")["acc"] == top1["acc"]
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_codes_of_one_net_are_evaluated_once_and_score_alike(trained, micro_data, tmp_path):
    st, _ = trained
    # stage 1's first conv1 code 2 against 3: at MICRO's width x0.125 every stage-1 code gives
    # 8 channels, so the two codes are one net there (the same outputs, bit for bit); at full
    # width they give 64 and 56 channels
    a = supernet.decode("1332312111110000122222000051110000000000002424640000")
    b = supernet.decode("1332313111110000122222000051110000000000002424640000")
    other = supernet.decode("1233233333000000122222000043333300000000003353000000")
    assert supernet.physical_net(a, MICRO.shape) == supernet.physical_net(b, MICRO.shape)
    assert supernet.physical_net(a, supernet.NetShape()) != supernet.physical_net(
        b, supernet.NetShape())
    x = micro_data.eval_batches(8)[0][0]
    with torch.no_grad():
        torch.testing.assert_close(st.net.eval()(x, a), st.net(x, b), rtol=0, atol=0)
    log = search.SearchLog(tmp_path / "search.jsonl", "w", "cpu-test")
    fitness = search.Fitness(st, micro_data, log)
    scores = fitness([a, b, other])
    assert fitness.evaluated == 2
    assert scores[supernet.encode(a)] == scores[supernet.encode(b)]
    # and b evaluated on its own gives that score: the reuse repeats what evaluation gives
    alone = search.Fitness(st, micro_data, search.SearchLog(tmp_path / "b.jsonl", "w", "cpu"))
    assert alone([b]) == {supernet.encode(b): scores[supernet.encode(a)]}
    # a later process reads the log back and evaluates neither code again
    again = search.Fitness(st, micro_data, search.SearchLog(tmp_path / "search.jsonl", "w", "c"))
    assert again([b, a]) == {supernet.encode(c): scores[supernet.encode(c)] for c in (b, a)}
    assert again.evaluated == 0
