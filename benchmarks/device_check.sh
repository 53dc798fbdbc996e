#!/usr/bin/env bash
# Everything that needs a GPU, in one script that finishes in under 8 minutes on one GPU and
# prints its ratios (issue 23). Run it whenever a device is lent; put its output in
# docs/performance.md with the date and the machine.
#
#   bash benchmarks/device_check.sh            # from the repository root, .venv installed
#
# 1. the CUDA tests (tests marked `cuda`: the sim on cuda:0 against the CPU, a run end to end with
#    its peak_mem_bytes, checkpointing lowering CUDA's own peak)
# 2. benchmarks/sim_scaling on cuda: sync against the plain loop at batch N*b on the same GPU
#    (target >= 0.7), local SGD and async alongside
# 3. a dist run on NCCL, one rank per GPU that exists
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
WS=$(mktemp -d)
trap 'rm -rf "$WS"' EXIT
status=0

echo "== machine: $(date -u +%Y-%m-%dT%H:%MZ) $(uname -n)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
GPUS=$($PY -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
echo "== torch sees $GPUS CUDA device(s)"
if [ "$GPUS" -eq 0 ]; then
    echo "no CUDA device: nothing to check here"; exit 1
fi

echo "== 1. CUDA tests"
timeout 180 $PY -m pytest tests/test_devices.py -q -p no:randomly -n 0 -m cuda -rs || status=1

echo "== 2. sim_scaling on cuda (ratio = sim samples/s / plain loop at batch N*b on the same GPU)"
timeout 240 $PY -m benchmarks.sim_scaling --device cuda --tasks mnist1d --strategies sync,local_sgd,async \
    --workers 8,64,256 --seconds 1.5 --reps 2 || status=1

echo "== 3. dist on NCCL: $GPUS rank(s), one per GPU"
timeout 150 $PY -m syncbench run digits_mlp --no-progress --workspace "$WS/ws" \
    --set cluster.backend=dist --set cluster.device=cuda --set "cluster.workers=$GPUS" \
    --set budget.train_time_s=3 --set eval.every_s=0.5 || status=1
$PY - "$WS/ws" <<'PYEOF' || status=1
import sys
from pathlib import Path
from mlflow.tracking import MlflowClient
client = MlflowClient(tracking_uri=f"sqlite:///{Path(sys.argv[1]) / 'mlflow.db'}")
runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
for r in runs:
    tags = {k: v for k, v in r.data.tags.items() if "backend" in k or "device" in k}
    print(r.info.status, tags, {k: round(v, 4) for k, v in r.data.metrics.items()
                                if k in ("val_acc", "tta_s", "peak_mem_bytes", "activation_bytes")})
PYEOF
echo "== 4. checkpointing memory: CUDA's peak over one step against the graph walk (charlm, sim on cuda)"
for on in false true; do
    timeout 60 $PY -m syncbench run charlm --no-progress --workspace "$WS/ckpt" --set cluster.device=cuda \
        --set checkpointing.enabled=$on --set budget.train_time_s=0.2 --set eval.every_s=0.1 >/dev/null || status=1
done
$PY - "$WS/ckpt" <<'PYEOF' || status=1
import sys
from pathlib import Path
from mlflow.tracking import MlflowClient
client = MlflowClient(tracking_uri=f"sqlite:///{Path(sys.argv[1]) / 'mlflow.db'}")
runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
for r in sorted(runs, key=lambda r: r.data.params.get("checkpointing.enabled", "")):
    m = r.data.metrics
    print(f"checkpointing={r.data.params.get('checkpointing.enabled')}: peak_mem_bytes={m.get('peak_mem_bytes')} "
          f"activation_bytes={m.get('activation_bytes')}")
PYEOF
echo "== done (status $status)"
exit $status
