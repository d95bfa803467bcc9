#!/usr/bin/env bash
# The README's main job (configs/dmd2/digits.yaml) at its own wall-clock budget, with one change at a time:
# fit on one thread, then FID at 1 NFE (2,000 samples) for sampling seeds 0 1 2 (SEEDS="3 4 5" for a check).
# Two variants run side by side on the 2-core machine, so each had at most one core; a fit records its wall and CPU
# seconds (the CPU time of the process, comparable between runs that shared the machine alike).
# Results: benchmarks/results/dmd2_digits_budget.md.
#   bash benchmarks/dmd2_budget.sh NAME [fit overrides...]
#   e.g. bash benchmarks/dmd2_budget.sh k10 --model.init_args.generator_every 10 --trainer.max_steps 1265
set -u
cd "$(dirname "$0")/.."
name=$1; shift
out=runs/benchmark_dmd2_budget
mkdir -p $out
export OMP_NUM_THREADS=1
TIMEFORMAT="%R %U %S"
{ time python -m lit_fewstep fit --config configs/dmd2/digits.yaml --trainer.logger.init_args.save_dir $out \
  --trainer.logger.init_args.name $name --trainer.enable_progress_bar false "$@" > $out/$name.fit.log 2>&1 ; } 2> $out/$name.time
read wall user sys < $out/$name.time
echo "$name fit_s $wall cpu_s $(echo "$user + $sys" | bc) load $(cut -d' ' -f1-3 /proc/loadavg)" >> $out/times.txt
for s in ${SEEDS:-0 1 2}; do
  python -m lit_fewstep evaluate --ckpt $out/$name/latest/model.pt --nfe 1 --num 2000 --seed $s \
    --out $out/$name.seed$s.json > $out/$name.eval$s.log 2>&1
  echo "$name seed $s $(grep '^| ' $out/$name.eval$s.log | tail -1)" >> $out/results.txt
done
