#!/usr/bin/env bash
# One command for a lent GPU (H200 budget: 8 minutes): the CUDA tests, then the benchmarks on cuda.
#   bash benchmarks/gpu.sh            -> benchmarks/results/{peers_cuda.csv, suite_paper_cuda*.csv, gpu_cuda.txt}
# Every step has its own time limit so one slow step cannot eat the others' time; a step that fails
# or times out is recorded in gpu_cuda.txt and the script goes on.
set -u
cd "$(dirname "$0")/.."
[ -f .venv/bin/activate ] && . .venv/bin/activate
LOG=benchmarks/results/gpu_cuda.txt
mkdir -p benchmarks/results
{
  echo "benchmarks/gpu.sh $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
} | tee "$LOG"
step() {  # step <seconds> <name> <command...>
  local limit=$1 name=$2; shift 2
  local t0=$(date +%s)
  timeout "$limit" "$@" 2>&1 | tail -n 40 > "/tmp/gpu_step_$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: rc=$rc in $(( $(date +%s) - t0 )) s (limit $limit s): $*" | tee -a "$LOG"
  cat "/tmp/gpu_step_$name.log" >> "$LOG"
}
step 150 tests python -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_fused_cuda.py
step 200 peers_cuda python benchmarks/_peers_cuda.py --L 4096 16384 --w 4 16 --B 1 --repeats 5
step 100 suite_paper python benchmarks/suite.py --suite paper --device cuda --quick
echo "done $(date -u +%FT%TZ)" | tee -a "$LOG"
