import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

import nas
import presets
import supernet
from conftest import ROOT

runner = CliRunner()
COMMANDS = ["arch", "sample", "train", "groundtruth", "evaluate", "report", "all", "tui", "search",
            "export", "import-weights"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_of_every_command(command):
    result = runner.invoke(nas.app, [command, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output


def one_line_error(result, words):
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], result.output
    assert "Traceback" not in result.output


@pytest.fixture
def runs(tmp_path, monkeypatch):
    monkeypatch.setattr(nas, "RUNS", tmp_path / "runs")
    return tmp_path / "runs"


def test_bad_inputs_get_one_line_and_exit_2(runs, tmp_path):
    one_line_error(runner.invoke(nas.app, ["all", "--preset", "huge"]), "unknown preset 'huge'")
    one_line_error(runner.invoke(nas.app, ["train", "--preset", "tiny", "--name", "x", "--stages",
                                           "aps,zzz"]),
                   "unknown stage 'aps'")
    one_line_error(runner.invoke(nas.app, ["train", "--preset", "tiny", "--name", "x", "--data-dir",
                                           str(tmp_path / "nowhere")]), "is not a folder")
    one_line_error(runner.invoke(nas.app, ["arch", "1" * 52]), "position")
    one_line_error(runner.invoke(nas.app, ["report", "--name", "nothing"]), "no run 'nothing'")
    one_line_error(runner.invoke(nas.app, ["train", "--preset", "tiny", "--name", "new",
                                           "--resume"]),
                   "nothing to resume")
    (tmp_path / "bad.json").write_text("[1, 2")
    one_line_error(runner.invoke(nas.app, ["evaluate", "--name", "x", "--archs",
                                           str(tmp_path / "bad.json"),
                                           "--out", str(tmp_path / "out.json")]), "not valid JSON")
    assert not (tmp_path / "out.json").exists()
    for flops, words in (("0", "must be positive"), ("1K", "below the smallest arch"),
                         ("2.5Q", "not a number")):
        one_line_error(runner.invoke(nas.app, ["search", "--name", "x", "--flops", flops]), words)
    one_line_error(runner.invoke(nas.app, ["search", "--name", "x", "--latency-ms", "-1"]),
                   "must be positive")
    one_line_error(runner.invoke(nas.app, ["export", "--name", "x", supernet.MAX_CODE, "--out",
                                           str(tmp_path / "bad.json")]), "exists")
    assert not runs.exists()


def test_an_existing_run_is_never_overwritten(runs):
    config = presets.run_config(presets.PRESETS["tiny"], ("warmup",), 0, "v3", True)
    nas.open_run("r", config, False, runs)
    saved = (runs / "r" / "config.json").read_text()
    one_line_error(runner.invoke(nas.app, ["train", "--preset", "tiny", "--name", "r", "--stages",
                                           "warmup"]),
                   "already exists")
    one_line_error(runner.invoke(nas.app, ["train", "--preset", "tiny", "--name", "r", "--stages",
                                           "cpt", "--resume"]), "different config (stages)")
    assert (runs / "r" / "config.json").read_text() == saved


def test_arch_json_has_the_documented_keys():
    result = runner.invoke(nas.app, ["arch", "15585" + "1" * 47, "--json"])
    info = json.loads(result.output)
    assert {"depths", "stem", "blocks", "flops", "params"} <= info.keys()
    assert info["params"] == 34043688 and len(info["blocks"]) == 23


def test_nas_imports_no_textual_unless_the_ui_is_asked_for():
    code = "import sys, nas; sys.exit('textual' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_every_option_of_every_command_passes_through_torchrun_unchanged():
    import typer.main
    from torch.distributed.run import get_args_parser
    parser = get_args_parser()
    group = typer.main.get_command(nas.app)
    options = {(name, opt) for name, command in group.commands.items()
               for param in command.params for opt in param.opts + param.secondary_opts
               if opt.startswith("-")}
    assert ("train", "--name") in options and ("all", "--archs-n") not in options
    for name, opt in sorted(options):
        argv = ["nas.py", name, opt, "1"]
        parsed = parser.parse_args(["--nproc_per_node=2"] + argv)
        assert [parsed.training_script] + parsed.training_script_args == argv, opt


def test_the_gpu_preset_trains_its_ground_truth_in_torchrun_processes(monkeypatch):
    from pathlib import Path
    from torch.distributed.run import get_args_parser
    command = nas.side_by_side_command("r", presets.PRESETS["gpu"], 3, Path("/d"))
    assert command[1:3] == ["-m", "torch.distributed.run"]
    parsed = get_args_parser().parse_args(command[3:])
    assert parsed.standalone and int(parsed.nproc_per_node) == presets.PRESETS["gpu"].gt_processes
    assert parsed.training_script_args == ["groundtruth", "--preset", "gpu", "--name", "r",
                                           "--seed", "3", "--device", "cuda", "--data-dir", "/d"]
    # `all` hands the ground truth to them on a GPU only, and stops with one line if they fail
    calls = []
    monkeypatch.setattr(nas.subprocess, "run", lambda cmd: calls.append(cmd) or
                        type("Done", (), {"returncode": 1})())
    with pytest.raises(nas.typer.Exit) as e:
        nas.ground_truth_side_by_side("r", presets.PRESETS["gpu"], 0, None)
    assert e.value.exit_code == 1 and calls and "--data-dir" not in calls[0]


def test_import_weights_writes_the_largest_net_as_export_does(tmp_path):
    import torch
    torch.manual_seed(0)
    net = supernet.StaticNet(supernet.MAX_ARCH, supernet.NetShape()).eval()
    torch.save(net.state_dict(), tmp_path / "given.pt")
    result = runner.invoke(nas.app, ["import-weights", str(tmp_path / "given.pt"), "--out",
                                     str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    program = torch.export.load(tmp_path / "out" / "net.pt2").module()
    x = torch.rand(2, 3, 224, 224)  # [0, 1] images: the program normalizes them itself
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(program(x), net((x - mean) / std), rtol=1e-4, atol=1e-4)
    saved = torch.load(tmp_path / "out" / "net.pt", weights_only=True)
    assert saved["code"] == supernet.MAX_CODE
    one_line_error(runner.invoke(nas.app, ["import-weights", str(tmp_path / "given.pt"),
                                           "--out", str(tmp_path / "out")]), "already holds")


def test_init_and_candidates_are_refused_with_one_line(runs, tmp_path):
    (tmp_path / "net.pt").write_bytes(b"neither format")
    one_line_error(runner.invoke(nas.app, ["train", "--preset", "tiny", "--name", "x", "--init",
                                           str(tmp_path / "net.pt")]),
                   "--init needs a full-width preset (paper)")
    one_line_error(runner.invoke(nas.app, ["train", "--preset", "paper", "--name", "x", "--init",
                                           str(tmp_path / "net.pt")]),
                   "neither the challenge's .pdparams nor a PyTorch state dict")
    one_line_error(runner.invoke(nas.app, ["train", "--preset", "paper", "--name", "x", "--init",
                                           str(tmp_path / "net.pt"), "--stages", "warmup,cpt"]),
                   "leave warmup out of --stages")
    few = {f"arch{i}": {"acc": 0, "arch": supernet.MAX_CODE} for i in range(3)}
    (tmp_path / "few.json").write_text(json.dumps(few))
    one_line_error(runner.invoke(nas.app, ["train", "--preset", "tiny", "--name", "x",
                                           "--candidates", str(tmp_path / "few.json")]),
                   "no arch in region 0 of sse34")
    one_line_error(runner.invoke(nas.app, ["train", "--preset", "tiny", "--name", "x",
                                           "--candidates", str(tmp_path / "none.json")]),
                   "cannot read")
    assert not runs.exists()


def test_no_fashion_mnist_anywhere_is_one_line(runs, tmp_path, monkeypatch):
    import torchvision

    import data
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path / "not-installed")
    monkeypatch.setattr(data, "DOWNLOADS", tmp_path / "downloads")

    def offline(root, train, download):
        raise OSError("no network here")
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    one_line_error(runner.invoke(nas.app, ["train", "--preset", "tiny", "--name", "x"]),
                   "torchvision could not download it")


@pytest.fixture
def trained_run(dry_run, tmp_path, monkeypatch):
    """A copy of the dry run's finished smoke run, as runs/NAME in the current folder."""
    import shutil
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(nas, "RUNS", tmp_path / "runs")
    shutil.copytree(dry_run.run, tmp_path / "runs" / dry_run.run.name)
    return tmp_path / "runs" / dry_run.run.name


def test_search_export_and_evaluate_from_the_command_line(trained_run, tmp_path):
    import torch
    name = trained_run.name
    result = runner.invoke(nas.app, ["search", "--name", name, "--flops", "6G", "--population",
                                     "4", "--generations", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    found = json.loads((trained_run / "search.json").read_text())
    assert found["best"]["flops"] <= 6e9 and "best under FLOPs <= 6 G" in result.output
    code = found["best"]["arch"]
    result = runner.invoke(nas.app, ["export", "--name", name, code, "--out",
                                     str(tmp_path / "net.pt")])
    assert result.exit_code == 0, result.output
    program = torch.export.load(tmp_path / "net.pt2").module()
    assert program(torch.rand(3, 1, 14, 14)).shape == (3, 10)
    # a challenge file filled in: each arch's acc is what the run's evaluation gave it
    results = json.loads((trained_run / "results.json").read_text())
    entries = {f"arch{i}": {"acc": 0.0, "arch": a["arch"]}
               for i, a in enumerate(results["archs"], 1)}
    (tmp_path / "archs.json").write_text(json.dumps(entries))
    result = runner.invoke(nas.app, ["evaluate", "--name", name, "--archs",
                                     str(tmp_path / "archs.json"), "--out",
                                     str(tmp_path / "filled.json"), "--quiet"])
    assert result.exit_code == 0, result.output
    filled = json.loads((tmp_path / "filled.json").read_text())
    assert [filled[k]["acc"] for k in entries] == [a["supernet"] for a in results["archs"]]
