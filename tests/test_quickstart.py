"""The README's main job, in its reduced mode: every stage runs offline and leaves its files."""

from __future__ import annotations

import pytest
import torch

from sparse_peft import quickstart


def test_quickstart_quick_mode_runs_every_stage(tmp_path, capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # steady timings on a shared 2-core machine
    try:
        args = ["--quick", "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(tmp_path / "out"), "--device", "cpu"]
        assert quickstart.main(args) == 0
        first = capsys.readouterr().out
        assert quickstart.main(args) == 0  # the second run reuses the cached base
        second = capsys.readouterr().out
    finally:
        torch.set_num_threads(threads)
    out = tmp_path / "out"
    assert (out / "adapter_model.safetensors").exists() and (out / "adapter_config.json").exists()
    assert (out / "loss_curves.png").stat().st_size > 1000
    for text in (first, second):
        assert "logits identical -- OK" in text and "trainable" in text and "lora" in text
    assert "cache" in second.lower()


def test_every_method_gets_loras_trainable_count_from_lora_budget():
    # the quickstart's --method takes every preset; each must build at LoRA's budget (dsee, sltrain and
    # lora_ggpo carry a rank of their own, which equivalent_rank alone would leave no room for)
    from peft import LoraConfig, get_peft_model

    from sparse_peft import METHODS, SparseConfig
    from sparse_peft.methods import lora_budget

    from .conftest import tiny_llama

    lora = get_peft_model(tiny_llama(), LoraConfig(r=8, target_modules="all-linear")).get_nb_trainable_parameters()[0]
    for name in METHODS:
        config = SparseConfig(method=name, target_modules="all-linear", **lora_budget(name, 8))
        trainable = get_peft_model(tiny_llama(), config).get_nb_trainable_parameters()[0]
        assert trainable == pytest.approx(lora, rel=0.05), name
    with pytest.raises(ValueError, match="unknown method"):
        lora_budget("nope", 8)


@pytest.mark.parametrize("method, stats", [
    ("spiel", ["sparse/churn"]),  # regrowth
    ("sara", ["sparse/nuclear_norm", "sparse/progressive_kept"]),  # the penalty and the progressive step
    ("lora_ggpo", ["sparse/perturbation_std"]),  # the noise, refreshed each step
])
def test_quickstart_runs_each_methods_whole_recipe(tmp_path, capsys, method, stats):
    # the default (dsee) has no schedule; these methods' own steps must all run, with nothing but opt.step()
    args = ["--quick", "--method", method, "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(tmp_path / "out"),
            "--device", "cpu"]
    assert quickstart.main(args) == 0
    out = capsys.readouterr().out
    assert f"sparse ({method})" in out
    ran = next(line for line in out.splitlines() if "schedule ran" in line)
    assert all(stat in ran for stat in stats), ran


def test_threads_one_on_few_or_busy_cores_unless_told(monkeypatch, capsys, tmp_path):
    # two threads on a 2-core machine with one core busy made the default run take 37 minutes instead of 2-4
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    machine = {"cores": 2, "load": 0.0}
    monkeypatch.setattr(quickstart.os, "sched_getaffinity", lambda pid: set(range(machine["cores"])), raising=False)
    monkeypatch.setattr(quickstart.os, "getloadavg", lambda: (machine["load"], 0.0, 0.0), raising=False)
    assert quickstart.cpu_threads()[0] == 1  # 2 idle cores: still one
    machine.update(cores=16, load=0.0)
    assert quickstart.cpu_threads()[0] == 4
    machine.update(cores=16, load=13.5)  # 2 idle cores: one of them kept spare
    assert quickstart.cpu_threads()[0] == 1
    machine.update(cores=8, load=4.2)
    assert quickstart.cpu_threads()[0] == 2
    assert quickstart.cpu_threads(3) == (3, "--threads")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert quickstart.cpu_threads()[1] == "OMP_NUM_THREADS"
    with pytest.raises(SystemExit):
        quickstart.parse_args(["--threads", "0"])
    assert "--threads" in capsys.readouterr().err

    # main sets them for its run, says so, and gives the caller its own setting back
    seen = []
    monkeypatch.setattr(quickstart, "run", lambda args: seen.append(torch.get_num_threads()) or 0)
    before = torch.get_num_threads()
    assert quickstart.main(["--threads", "2", "--output-dir", str(tmp_path)]) == 0
    assert seen == [2] and torch.get_num_threads() == before
    assert "torch CPU threads: 2 (--threads)" in capsys.readouterr().out
