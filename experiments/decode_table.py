"""The README's decode table from bench_decode.py JSON files (results/bench/decode_h200_*.json).

One row per (batch, prompt) point and path: decode ms/token against its floor, the decode and end-to-end
speedups against transformers `generate` (same run), the decode speedup against the framework's own full-cache
path with 90% of the floor ratio beside it, prefill + compression against the full path's, KV bytes kept and
the storage allocated for them while decoding (the reserved cache less its room for generated tokens; rows from
runs before that was recorded leave it empty) as a share of the full cache's.

Usage: python experiments/decode_table.py FILE[:BxP,...][:-policy,...] ...

`FILE:4x32768` takes only that point's rows from FILE (each point's rows must come from one run, so that its
ratios do); `:-h2o,elastic` leaves those presets out (e.g. rows a run made with code that has changed since).
"""

from __future__ import annotations

import json
import sys

PAPER = {(1, 2048): (1.19, 1.16), (1, 32768): (3.32, 1.85), (1, 131072): (7.08, 1.66), (4, 32768): (6.07, 2.06),
         (64, 2048): (5.23, 2.33)}  # VL-Cache's speed table: decode, end-to-end speedup at budget 0.1


def rows_of(specs: list[str]) -> list[dict]:
    rows = []
    for spec in specs:
        path, *filters = spec.split(":")
        points = {tuple(int(x) for x in p.split("x")) for f in filters if not f.startswith("-") for p in f.split(",")}
        drop = {p for f in filters if f.startswith("-") for p in f[1:].split(",")}
        rows += [
            r
            for r in json.load(open(path))["rows"]
            if r["path"] in ("transformers", "fast")
            and (not points or (r["batch"], r["prompt_len"]) in points)
            and r["policy"] not in drop
        ]
    return rows


def main(paths: list[str]) -> None:
    rows = rows_of(paths)
    points = sorted({(r["batch"], r["prompt_len"]) for r in rows}, key=lambda p: (p[1] * p[0], p[0]))
    print("| (B, prompt) | path | decode ms/tok | × floor | vs HF (paper) | vs own full (90% floor ratio) | "
          "e2e vs HF (paper) | prefill+compress vs full | KV kept / full | KV allocated / full |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for point in points:
        here = [r for r in rows if (r["batch"], r["prompt_len"]) == point]
        hf = next(r for r in here if r["path"] == "transformers")
        full = next(r for r in here if r["path"] == "fast" and r["policy"] == "full")
        full_pre = full["prefill_ms"] + full.get("compress_ms", 0)
        paper_dec, paper_e2e = PAPER.get(point, (None, None))
        for r in [hf, full] + sorted((r for r in here if r["path"] == "fast" and r["policy"] != "full"),
                                     key=lambda r: r["policy"]):
            name = "transformers generate" if r is hf else f"fast {r['policy']}"
            dec = r["decode_ms_per_token"]
            cells = [f"({point[0]}, {point[1] // 1024}K)", name, f"{dec:.2f}", f"{dec / r['floor_ms']:.2f}"]
            if r is hf:
                cells += ["1", "", "1", "", "100%", ""]
            else:
                vs_full = full["decode_ms_per_token"] / dec
                want = 0.9 * full["floor_ms"] / r["floor_ms"]
                pre = (r["prefill_ms"] + r.get("compress_ms", 0)) / full_pre - 1
                cells += [
                    f"{hf['decode_ms_per_token'] / dec:.2f}" + ("" if r is full else f" ({paper_dec})"),
                    "" if r is full else f"{vs_full:.2f} ({want:.2f})",
                    f"{hf['e2e_ms'] / r['e2e_ms']:.2f}" + ("" if r is full else f" ({paper_e2e})"),
                    "" if r is full else f"{pre:+.1%}",
                    f"{r['kv_bytes'] / full['kv_bytes']:.1%}",
                    f"{r['kv_bytes_prompt_storage'] / full['kv_bytes']:.1%}" if "kv_bytes_prompt_storage" in r else "",
                ]
            print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
