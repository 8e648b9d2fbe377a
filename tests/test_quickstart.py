"""The README's main job, in its reduced mode: every stage runs offline and leaves its files."""

from __future__ import annotations

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
