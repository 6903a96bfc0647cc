"""Compares two runs of the same sweep (issue 9's multi-GPU check): same jobs, same metrics, same answers.

    python experiments/compare_sweeps.py A/sweeps/NAME B/sweeps/NAME [--wall-a S --wall-b S] [--json out.json]
        [--ignore model.device_map] [--only budget=0.2,dataset=synth_docvqa]

A job is matched by its folder name (its overrides), less the overrides named by --ignore; --only keeps the jobs
whose overrides include all of the given ones. Metrics are compared exactly, answers sample by sample;
timings are left out (they differ by nature). Prints one line per difference and a summary, and exits 1 if the
two runs disagree or a job is missing or failed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def key(name: str, ignore: set[str]) -> str:
    """A job folder's name (its overrides, `k=v,k=v`) without the overrides that `ignore` names."""
    return ",".join(part for part in name.split(",") if part.split("=")[0] not in ignore)


def read(sweep: Path, ignore: set[str] = frozenset(), only: set[str] = frozenset()) -> dict[str, dict]:
    jobs = {}
    for metrics_file in sorted(sweep.glob("*/metrics.json")):
        job = metrics_file.parent
        if not only <= set(job.name.split(",")):
            continue
        metrics = json.loads(metrics_file.read_text())
        samples = job / "samples.jsonl"
        answers = [json.loads(line)["answer"] for line in samples.read_text().splitlines()] if samples.exists() else []
        jobs[key(job.name, ignore)] = dict(status=metrics["status"], metrics=metrics.get("metrics"),
                              realised=metrics.get("realised_budget"), answers=answers,
                              samples_per_s=metrics.get("samples_per_s"), device=metrics.get("device"))
    return jobs


def compare(a: dict[str, dict], b: dict[str, dict]) -> list[str]:
    problems = [f"only in {side}: {name}" for side, x, y in (("A", a, b), ("B", b, a)) for name in x if name not in y]
    for name in sorted(set(a) & set(b)):
        ja, jb = a[name], b[name]
        if ja["status"] != "ok" or jb["status"] != "ok":
            problems.append(f"{name}: status {ja['status']} / {jb['status']}")
            continue
        if ja["metrics"] != jb["metrics"] or ja["realised"] != jb["realised"]:
            problems.append(f"{name}: metrics {ja['metrics']} (realised {ja['realised']}) / "
                            f"{jb['metrics']} (realised {jb['realised']})")
        differ = sum(x != y for x, y in zip(ja["answers"], jb["answers"]))
        differ += abs(len(ja["answers"]) - len(jb["answers"]))
        if differ:
            problems.append(f"{name}: {differ} of {len(ja['answers'])} answers differ")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--wall-a", type=float, default=None, help="wall-clock seconds of run A")
    parser.add_argument("--wall-b", type=float, default=None, help="wall-clock seconds of run B")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--ignore", default="", help="override keys left out of the job names, comma-separated")
    parser.add_argument("--only", default="", help="keep jobs with all of these overrides, e.g. budget=0.2")
    args = parser.parse_args()
    ignore, only = set(filter(None, args.ignore.split(","))), set(filter(None, args.only.split(",")))
    a, b = read(args.a, ignore, only), read(args.b, ignore, only)
    problems = compare(a, b)
    for line in problems:
        print("DIFF", line)
    summary = dict(jobs_a=len(a), jobs_b=len(b), differences=len(problems), problems=problems,
                   devices_a=sorted({j["device"] for j in a.values() if j["device"]}),
                   devices_b=sorted({j["device"] for j in b.values() if j["device"]}),
                   wall_a_s=args.wall_a, wall_b_s=args.wall_b)
    if args.wall_a and args.wall_b:
        summary["speedup_b_over_a"] = args.wall_a / args.wall_b
    print(json.dumps({k: v for k, v in summary.items() if k != "problems"}, indent=1))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    sys.exit(1 if problems or not a or len(a) != len(b) else 0)


if __name__ == "__main__":
    main()
