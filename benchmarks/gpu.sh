#!/usr/bin/env bash
# Issue #17's GPU figures in one call on a lent device (prepared on a CPU machine; budget about 8 minutes on an
# H100): decoding per new token against PEFT LoRA at 1024 wide with CUDA graphs off, then on (a static cache,
# which generate compiles), one decoding forward, and the true step peaks from torch.cuda.max_memory_allocated.
#
#     bash benchmarks/gpu.sh            # the tables go to $OUT (the device tool's folder) or /tmp/gpu
#
# Uses the machine's own torch, transformers and peft; sparse_peft from this checkout. Each stage has its own
# time limit, so one that hangs (a compile) leaves the others' tables.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
out="${OUT:-/tmp/gpu}"
mkdir -p "$out"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
} 2>&1 | tee "$out/device.txt"
stage() {  # stage NAME SECONDS ARGS...: one script's tables into $out/NAME.md
  local name=$1 limit=$2; shift 2
  echo "== $name: python3 $*"
  timeout "$limit" python3 "$@" 2>"$out/$name.err" | tee "$out/$name.md" || echo "(stage $name failed or ran out of time: $out/$name.err)"
}
stage decode 150 benchmarks/serving.py --device cuda --no-peak --shapes 1024:1 1024:8 --rounds 3
stage decode_graphs 180 benchmarks/serving.py --device cuda --cuda-graphs --no-peak --shapes 1024:1 --rounds 3
stage forward 60 benchmarks/serving.py --device cuda --forward
stage peak 90 benchmarks/peak.py --device cuda
