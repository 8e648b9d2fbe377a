"""examples/sltrain/pretrain.py in --quick mode: three models trained, the table printed, the SLTrain model
saved, reloaded and densified, and the low-rank baseline matched to SLTrain's parameter count."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch


SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "sltrain" / "pretrain.py"


@pytest.fixture
def pretrain():
    spec = importlib.util.spec_from_file_location("example_sltrain_pretrain", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # two threads on a shared 2-core machine are many times slower than one for these tiny matrices
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield module
    torch.set_num_threads(threads)


def test_quick_run_prints_three_rows_reloads_and_matches_parameters(pretrain, tmp_path, capsys):
    results = pretrain.main(["--quick", "--out", str(tmp_path), "--plot"])
    printed = capsys.readouterr().out

    rows = results["rows"]
    assert [r["model"] for r in rows] == ["full-rank", "low-rank", "sltrain"]
    table = printed[printed.index("\nmodel "):].splitlines()[3:6]  # blank, header, rule, then the rows
    assert [line.split()[0] for line in table] == ["full-rank", "low-rank", "sltrain"]
    for r in rows:
        assert r["val_loss"] < r["curve"][0][1]  # every model learned something in 8 steps
        assert r["state"] > 0 and r["saved"] > 0

    # save_pretrained -> pretraining.from_pretrained gives the trained eval loss exactly, densify within 1e-4
    reload = results["reload"]
    assert reload["reloaded"] == reload["eval_loss"] == rows[2]["val_loss"]
    assert abs(reload["densified"] - reload["eval_loss"]) <= 1e-4
    assert "identical -- OK" in printed and (tmp_path / "sltrain" / "model.safetensors").exists()

    # low-rank only is given SLTrain's parameters; full-rank has more
    low, sl, full = (r["linear_params"] for r in (rows[1], rows[2], rows[0]))
    assert abs(low / sl - 1) < 0.01 and abs(rows[1]["params"] / rows[2]["params"] - 1) < 0.01
    assert full > sl
    assert (tmp_path / "val_curves.png").stat().st_size > 0
    assert json.loads((tmp_path / "results.json").read_text())["rows"][2]["model"] == "sltrain"


def test_low_rank_baseline_carries_rounding_so_any_shape_matches():
    spec = importlib.util.spec_from_file_location("example_sltrain_pretrain_2", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # shapes where rounding each layer's rank alone would be off by more than 1 %
    args = module.parse_args(["--quick"])
    args.model = dict(hidden_size=48, intermediate_size=100, num_hidden_layers=3, num_attention_heads=2)
    args.rank = 4
    low, ranks = module.build("low-rank", args)
    sl, _ = module.build("sltrain", args)
    count = lambda m: sum(p.numel() for p in m.model.layers.parameters())  # noqa: E731
    assert abs(count(low) / count(sl) - 1) < 0.01
    assert max(ranks) - min(ranks) <= 2
