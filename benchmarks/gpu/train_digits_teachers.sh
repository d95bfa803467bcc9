#!/usr/bin/env bash
# Train the two shipped digits teachers on one GPU with their committed configs (the same commands run
# on CPU in ~25 min each), then check CUDA sampling. Used for lit_fewstep/assets/{edm,fm}_digits.pt.
# Usage on a GPU machine (repo root):  OUT=/some/dir bash benchmarks/gpu/train_digits_teachers.sh
set -euo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
RUNS=/tmp/lit_fewstep_runs
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__, torch.cuda.get_device_name())"
for method in edm flow_matching; do
  name=$([ $method = edm ] && echo edm_digits || echo fm_digits)
  start=$(date +%s)
  python3 -m lit_fewstep fit --config configs/$method/digits.yaml --trainer.accelerator gpu \
    --trainer.enable_progress_bar false --trainer.logger.init_args.save_dir $RUNS > "$RUNS.$name.log" 2>&1 \
    || { tail -40 "$RUNS.$name.log"; exit 1; }
  echo "$name: trained in $(( $(date +%s) - start )) s"
  cp $RUNS/$name/main/model.pt "$OUT/$name.pt"
  python3 -m lit_fewstep sample --ckpt "$OUT/$name.pt" --device cuda --nfe 35 --num 10000 --batch_size 10000 --out /tmp/$name.npz
  python3 -m lit_fewstep sample --ckpt "$OUT/$name.pt" --device cuda --nfe 35 --num 100 --out "$OUT/$name.png" --class_labels 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9
done
