"""Where a step's device time goes: a table from a jax profiler trace.

``jax.profiler`` (e.g. ``benchmarks/train_step.py --profile DIR``) writes
``DIR/plugins/profile/<run>/<host>.trace.json.gz`` (Chrome trace format) next to the
xplane file. This script reads it with the standard library only and prints, for the
device timelines (``/device:GPU:0``, ...; on CPU, the HLO ops of the host threads), the
busy time per step and the ops that take it, grouped by HLO op (the ``hlo_op`` argument
of the events; the event name otherwise) and by kind (matmul, attention,
collective, sort, fusion, ...)::

  python benchmarks/trace_summary.py DIR --steps 3 [--top 30]

Durations are summed over events, so overlapping streams can add up to more than the
wall time; ``busy`` is the union of the intervals, per device.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re

#: first match wins; the pattern is searched in the lower-cased op name.
KINDS: tuple[tuple[str, str], ...] = (
    ("collective", r"nccl|all-to-all|all-reduce|all-gather|reduce-scatter|collective|permute"),
    ("attention", r"cudnn|flash|fmha|attention|custom-call.*dot_product"),
    ("grouped matmul (pallas)", r"gmm|grouped|pallas|triton"),
    ("matmul", r"gemm|cublas|cutlass|dot|matmul|xmma|nvjet|ynn"),
    ("sort", r"sort|cub::|radix"),
    ("copy / transpose", r"copy|transpose|memcpy|memset|dynamic-update-slice"),
    ("scatter / gather", r"scatter|gather"),
    ("reduce", r"reduce"),
    ("fusion (elementwise)", r"fusion|loop_|input_"),
)


def kind_of(op: str) -> str:
    low = op.lower()
    for kind, pattern in KINDS:
        if re.search(pattern, low):
            return kind
    return "other"


def find_trace(path: str) -> str:
    """The newest ``*.trace.json.gz`` under ``path`` (or ``path`` itself)."""
    if os.path.isfile(path):
        return path
    found = glob.glob(os.path.join(path, "**", "*.trace.json.gz"), recursive=True)
    if not found:
        raise FileNotFoundError(f"no *.trace.json.gz under {path!r} (jax.profiler output)")
    return max(found, key=os.path.getmtime)


def _union(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e > end:
            total += e - max(s, end)
            end = e
    return total


def summarize(trace: dict) -> dict:
    """``{"timelines": [...], "busy_us": {...}, "ops": {op: (us, count, kind, kernel)}}``."""
    events = trace["traceEvents"]
    names = {
        e["pid"]: e["args"]["name"]
        for e in events
        if e.get("ph") == "M" and e.get("name") == "process_name"
    }
    devices = {pid for pid, n in names.items() if "/device:" in n}
    spans = [e for e in events if e.get("ph") == "X" and "dur" in e]
    if devices:
        spans = [e for e in spans if e["pid"] in devices]
    else:  # CPU: XLA runs ops on host threads; keep the HLO ops, not runtime wrappers
        spans = [e for e in spans if (e.get("args") or {}).get("hlo_op")]
    ops: dict[str, list] = {}
    kernels: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    per_pid: dict[int, list[tuple[float, float]]] = collections.defaultdict(list)
    for e in spans:
        op = (e.get("args") or {}).get("hlo_op") or e["name"]
        entry = ops.setdefault(op, [0.0, 0, ""])
        entry[0] += e["dur"]
        entry[1] += 1
        kernels[op][e["name"]] += e["dur"]
        per_pid[e["pid"]].append((e["ts"], e["ts"] + e["dur"]))
    for op, entry in ops.items():
        # the kind from the op's longest-running kernel and its HLO name: a GPU gemm is
        # "custom-call.N" in HLO (its kernel says cublas/nvjet/gemm), and one op may launch
        # helper kernels (memsets, split-k reductions) besides its main one
        main_kernel = kernels[op].most_common(1)[0][0]
        entry[2] = kind_of(f"{main_kernel} {op}")
        entry.append(main_kernel)
    busy = {names.get(pid, str(pid)): _union(iv) for pid, iv in per_pid.items()}
    ops_out = {k: tuple(v) for k, v in ops.items()}
    return {"timelines": sorted(busy), "busy_us": busy, "ops": ops_out}


def format_summary(summary: dict, steps: int, top: int) -> str:
    ops = summary["ops"]
    total = sum(v[0] for v in ops.values()) or 1.0
    lines = ["| timeline | busy ms / step |", "|---|---|"]
    for name in summary["timelines"]:
        lines.append(f"| {name} | {summary['busy_us'][name] / steps / 1e3:.2f} |")
    kinds: dict[str, float] = collections.defaultdict(float)
    for us, _, kind, _ in ops.values():
        kinds[kind] += us
    lines += ["", "| kind | ms / step | share |", "|---|---|---|"]
    for kind, us in sorted(kinds.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {kind} | {us / steps / 1e3:.2f} | {us / total:.1%} |")
    lines += ["", "| op | kind | main kernel | calls / step | ms / step | share |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    clip = lambda s, n: s if len(s) <= n else s[: n - 3] + "..."
    for op, (us, n, kind, kernel) in sorted(ops.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(
            f"| `{clip(op, 60)}` | {kind} | `{clip(kernel, 50)}` | {n / steps:g} "
            f"| {us / steps / 1e3:.3f} | {us / total:.1%} |"
        )
    return "\n".join(lines)


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("path", help="a profiler output directory or a .trace.json.gz file")
    p.add_argument("--steps", type=int, default=1, help="steps the trace covers (divides)")
    p.add_argument("--top", type=int, default=30, help="rows of the per-op table")
    args = p.parse_args(argv)
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    path = find_trace(args.path)
    with gzip.open(path, "rt") as f:
        summary = summarize(json.load(f))
    text = f"trace: {path}\n\n" + format_summary(summary, args.steps, args.top)
    print(text)
    return text


if __name__ == "__main__":
    main()
