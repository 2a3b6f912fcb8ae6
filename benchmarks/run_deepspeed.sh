#!/usr/bin/env bash
# DeepSpeed, the spec's alternative strategy, for a few steps on one GPU through the product:
#   lit-deepseek fit --config configs/cpu_demo.yaml --trainer.strategy deepspeed (configs/deepspeed_config.json)
# Needs the deepspeed package. deepspeed 0.19 is an sdist whose CUDA ops build lazily, so it installs
# without a compiler: DS_BUILD_OPS=0 pip install --no-deps "deepspeed==0.19.*" hjson py-cpuinfo msgpack \
#   nvidia-ml-py ninja einops psutil   (pydantic too where it is missing)
# or point DEEPSPEED_PKGS at a folder such packages were installed into with `pip install --target`
# (e.g. .deepspeed_pkgs/, git-ignored, to carry to a machine without a package index).
# Bounded: the training run is killed after 300 s. Writes deepspeed_fit.log and deepspeed_result.txt to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/deepspeed_out}
RUN=${RUN:-/tmp/deepspeed_run}
mkdir -p "$OUT"
rm -rf "$RUN"
export PYTHONPATH="${DEEPSPEED_PKGS:+$DEEPSPEED_PKGS:}$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
if ! python3 -c "import deepspeed, sys; print('deepspeed', deepspeed.__version__, file=sys.stderr)" 2> "$OUT/deepspeed_import.log"; then
    echo "FAIL: deepspeed does not import: $(tail -1 "$OUT/deepspeed_import.log")" | tee "$OUT/deepspeed_result.txt"
    exit 3
fi
start=$(date +%s)
timeout 300 python3 -m lit_deepseek fit --config configs/cpu_demo.yaml --trainer.strategy deepspeed \
    --trainer.accelerator gpu --trainer.devices 1 --training.precision bf16-mixed --training.max_steps 30 \
    --training.val_every_n_steps 15 --training.val_batches 2 --checkpoint.every_n_steps 15 \
    --logging.log_every_n_steps 1 --logging.progress_bar false --logging.run_dir "$RUN" > "$OUT/deepspeed_fit.log" 2>&1
rc=$?
wall=$(( $(date +%s) - start ))
python3 - "$RUN" "$rc" "$wall" <<'PY' | tee "$OUT/deepspeed_result.txt"
import sys
from pathlib import Path

run, rc, wall = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
print(f"lit-deepseek fit --trainer.strategy deepspeed: exit {rc} after {wall} s")
db = run / "mlflow.db"
if db.is_file():
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db.resolve()}")
    run_id = (run / "mlflow_run_id").read_text().strip()
    losses = [m.value for m in sorted(client.get_metric_history(run_id, "train/loss"), key=lambda m: m.step)]
    if losses:
        print(f"train/loss: {len(losses)} steps, first {losses[0]:.4f}, last {losses[-1]:.4f}")
        print("PASS" if rc == 0 and losses[-1] < losses[0] else "FAIL: the loss did not fall")
    else:
        print("FAIL: no train/loss logged")
else:
    print("FAIL: no MLflow store (see deepspeed_fit.log)")
print("checkpoints:", sorted(p.name for p in (run / "checkpoints").glob("*")) if (run / "checkpoints").is_dir() else None)
PY
tail -5 "$OUT/deepspeed_fit.log"
exit "$rc"
