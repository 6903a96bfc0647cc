#!/usr/bin/env bash
# Issue 9 on a machine with 2+ GPUs, the embedded model, wall-clock and results kept under $OUT (or ./scale):
#   1. the same sweep with hydra/launcher=gpus on one GPU (CUDA_VISIBLE_DEVICES=0) and on all of them:
#      experiments/compare_sweeps.py checks the metrics and answers are equal and gives the wall-clock ratio;
#   2. the same model split over every GPU (model.device_map=auto) through run.py, every preset;
#   3. real-size random-weight models split over every GPU (experiments/real_size_check.py --device-map).
#     [PRESETS=full,h2o LIMIT=8 SPLIT_MODELS=llava16_34b] bash experiments/scale_check.sh [MORE OVERRIDES...]
# (SPLIT_MODELS= skips step 3; on a machine without GPUs, steps 1-2 still run, on the CPU, as a smoke test)
set -uo pipefail
out=${OUT:-scale}
work=${SCALE_WORK:-/tmp/vlcache-scale}
mkdir -p "$out" && rm -rf "$work"
presets=${PRESETS:-full,random,streamingllm,h2o,snapkv,pyramidkv,elastic,lookm,vlcache}
limit=${LIMIT:-300}
sweep=("policy=$presets" "budget=0.05,0.2" "dataset=synth_docvqa,synth_count" "limit=$limit" "$@")
steps=${STEPS:-sweep,split,real}  # which of the three steps to run
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
py=${PYTHON:-python3}

if [[ $steps == *sweep* ]]; then
t0=$(date +%s.%N)
CUDA_VISIBLE_DEVICES=0 $py run.py -m hydra/launcher=gpus "${sweep[@]}" output_root=$work/gpu1 >"$out/gpu1.log" 2>&1
t1=$(date +%s.%N)
$py run.py -m hydra/launcher=gpus "${sweep[@]}" output_root=$work/gpus >"$out/gpus.log" 2>&1
t2=$(date +%s.%N)
wall1=$(awk "BEGIN {print $t1 - $t0}") wall2=$(awk "BEGIN {print $t2 - $t1}")
echo "sweep on 1 GPU: $wall1 s; on all GPUs: $wall2 s"
$py experiments/compare_sweeps.py $work/gpu1/sweeps/default $work/gpus/sweeps/default --json "$out/compare.json" \
    --wall-a "$wall1" --wall-b "$wall2"
fi

# device_map: the whole model split over the GPUs, every preset, answers compared with the one-GPU run
if [[ $steps == *split* ]]; then
[ -d $work/gpu1/sweeps/default ] || CUDA_VISIBLE_DEVICES=0 $py run.py -m "policy=$presets" budget=0.2 \
    dataset=synth_docvqa limit=$limit output_root=$work/gpu1 >"$out/gpu1.log" 2>&1
$py run.py -m model.device_map=auto "policy=$presets" budget=0.2 dataset=synth_docvqa limit=$limit \
    output_root=$work/split >"$out/split.log" 2>&1
grep -ho "model split over.*" "$out/split.log" | sort | uniq -c
$py experiments/compare_sweeps.py $work/gpu1/sweeps/default $work/split/sweeps/default \
    --ignore model.device_map --only budget=0.2,dataset=synth_docvqa --json "$out/compare_split.json"
fi

split_models=${SPLIT_MODELS-llava16_34b,qwen2_5_vl_7b}
[[ $steps == *real* && -n "$split_models" ]] && $py experiments/real_size_check.py --device-map --models "$split_models" \
    --time-limit 300 2>&1 | tail -40
