#!/usr/bin/env python3
"""Compare the numbers of two runs of the same experiment: every summary.json, metrics.json, thresholds.json,
accuracy.json (and other JSON files named on the command line) under two results folders, key by key.

    python scripts/compare_runs.py results/smoke /other/checkout/results/smoke [--names summary.json ...]

Wall-clock timings (keys with "second", "wall", "elapsed" or ending in "_s") and absolute paths differ between
any two runs and are left out; everything else must be equal (floats exactly: the point is bitwise
reproducibility on one machine and thread count). Prints one line per file and exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

TIMING = re.compile(r"second|wall|elapsed|^time$|_s$|per_s$|throughput")
NAMES = ("summary.json", "metrics.json", "thresholds.json", "accuracy.json")


def numbers(doc: Any, path: str = "") -> dict[str, Any]:
    """Flatten a JSON document to {key path: leaf}, without timing keys."""
    out: dict[str, Any] = {}
    if isinstance(doc, dict):
        for key, value in doc.items():
            if TIMING.search(str(key)):
                continue
            out.update(numbers(value, f"{path}.{key}" if path else str(key)))
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            out.update(numbers(value, f"{path}[{i}]"))
    else:
        out[path] = doc
    return out


def differences(a: Path, b: Path) -> list[str]:
    na, nb = numbers(json.loads(a.read_text())), numbers(json.loads(b.read_text()))
    out = []
    for key in sorted(set(na) | set(nb)):
        va, vb = na.get(key, "<missing>"), nb.get(key, "<missing>")
        if va != vb and not (isinstance(va, str) and isinstance(vb, str) and ("/" in va or "/" in vb)):
            out.append(f"{key}: {va!r} != {vb!r}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--names", nargs="*", default=list(NAMES))
    args = parser.parse_args(argv)
    files = sorted(p.relative_to(args.a) for n in args.names for p in args.a.rglob(n))
    bad = 0
    for rel in files:
        other = args.b / rel
        if not other.is_file():
            print(f"MISSING {rel}")
            bad += 1
            continue
        diff = differences(args.a / rel, other)
        print(f"{'same' if not diff else 'DIFFERENT'} {rel}" + (f" ({len(diff)} values)" if diff else ""))
        for line in diff[:20]:
            print(f"    {line}")
        bad += bool(diff)
    print(f"{len(files)} files compared, {bad} differ")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
