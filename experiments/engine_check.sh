#!/usr/bin/env bash
# engine=fast against engine=simple through run.py and lmms-eval on the embedded model (on a GPU): the same
# answers, sample by sample, for a compressing and a per-token-rule preset. Usage: experiments/engine_check.sh OUT
set -euo pipefail
out=${1:-outputs/engine_check}
for engine in simple fast; do
  HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python3 run.py -m engine=$engine device=cuda dataset=synth_docvqa,synth_multi \
    policy=vlcache,h2o budget=0.1 limit=64 output_root="$out/$engine" sweep_name=check >/dev/null
done
python3 - "$out" <<'PY'
import json, pathlib, sys
root = pathlib.Path(sys.argv[1])
def answers(engine):
    got = {}
    for f in sorted((root / engine / "sweeps" / "check").glob("*/samples.jsonl")):
        rows = [json.loads(line) for line in f.open()]
        job = ",".join(p for p in f.parent.name.split(",") if not p.startswith("engine="))
        got[job] = [(r["answer"], r["error"]) for r in rows]
    return got
simple, fast = answers("simple"), answers("fast")
assert simple and simple.keys() == fast.keys(), (sorted(simple), sorted(fast))
for job in simple:
    same = sum(a == b for a, b in zip(simple[job], fast[job]))
    errors = sum(e is not None for _, e in simple[job] + fast[job])
    print(f"{job}: {same}/{len(simple[job])} answers equal, {errors} errors")
PY
