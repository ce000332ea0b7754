import json
import sys

import pytest

import nas
import train_stages as ts
from conftest import MICRO, ROOT

sys.path.insert(0, str(ROOT / "bench"))
import ablation  # noqa: E402


def run_ablation(tmp_path, variants):
    ablation.main(preset="micro", variants=variants, gt_n=3, seed=0, device="cpu", data_dir=None,
                  out=tmp_path / "results")
    return json.loads((tmp_path / "results" / "ablation-fashion-mnist-cpu.json").read_text())


def test_ablation_chains_variants_and_never_trains_twice(tmp_path, monkeypatch, micro_data):
    monkeypatch.setitem(nas.PRESETS, "micro", MICRO)
    monkeypatch.setattr(nas, "RUNS", tmp_path / "runs")
    first = run_ablation(tmp_path, "APS_v3,APS_v3+CPT,Pi-NAS")
    rows = {r["variant"]: r for r in first["rows"]}
    assert list(rows) == ["FLOPs", "params", "APS_v3", "APS_v3+CPT", "Pi-NAS"]
    assert all(r["metrics"]["n"] == 3 for r in rows.values())
    assert rows["APS_v3+CPT"]["stages"] == ["warmup", "aps_depth", "aps_width", "cpt"]
    # +CPT went on from APS_v3's checkpoint: its time includes APS_v3's whole chain
    assert rows["APS_v3+CPT"]["seconds"] > rows["APS_v3"]["seconds"]
    checkpoints = {p.name for p in (tmp_path / "runs" / "ablation-micro" / "checkpoints").glob("*.pt")}
    assert checkpoints == {"warm-up.pt", "APS_v3.pt", "APS_v3+CPT.pt", "Pi-NAS-pre.pt", "Pi-NAS.pt"}

    def no_training(*args, **kwargs):
        raise AssertionError("a finished variant was trained again")
    monkeypatch.setattr(ts, "train", no_training)
    again = run_ablation(tmp_path, "APS_v3+CPT,Pi-NAS")
    for r in again["rows"][2:]:
        assert r["accs"] == rows[r["variant"]]["accs"]
    md = (tmp_path / "results" / "ablation-fashion-mnist-cpu.md").read_text()
    assert "| APS_v3+CPT |" in md and "| Pi-NAS |" in md


def test_ablation_refuses_an_unknown_variant(tmp_path, monkeypatch):
    monkeypatch.setitem(nas.PRESETS, "micro", MICRO)
    with pytest.raises(Exception) as e:
        run_ablation(tmp_path, "APS_v9")
    assert getattr(e.value, "exit_code", None) == 2
