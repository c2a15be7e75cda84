"""Compare two bench runs field by field, apart from what depends on timing or on the machine's state.

The "behaviour unchanged" check of a refactoring: run the same fixed grid before and after (same command, same
machine), then

    python scripts/compare_bench_records.py BEFORE.jsonl AFTER.jsonl

prints, per method, every field whose value differs, every field only one side has, and exits 1 if any shared
field differs, or if a label, variant or colour that the report now reads from a record differs from the one it
computed from the older record. Ignored: wall and CPU times and the ratios made from them, the run's id and
elapsed time, the process's peak memory (it depends on what ran before in the process) and the machine facts. A
``config`` written flat (a ``TaylorSeerConfig`` dict, before issue 21) is compared as the ``CacheConfig`` it stands
for (``taylorseer.parts.load_config``), so the same method written in either vocabulary compares equal.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from taylorseer.eval.labels import describe
from taylorseer.parts import load_config

TIMING = {"wall_s", "wall_min_s", "wall_max_s", "wall_samples_s", "cpu_s", "wall_full_s", "wall_speedup",
          "efficiency", "bench_elapsed_s", "run_id", "process_max_rss_mb", "machine"}


def methods(path: str) -> dict[str, dict[str, Any]]:
    """The method records of the last run of a JSONL file, by name."""
    rows = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    last = rows[-1].get("run_id")
    return {r["name"]: r for r in rows if r.get("run_id") == last and r.get("kind", "method") == "method"}


def config(value: Any) -> Any:
    """A record's config as a comparable dict: ``CacheConfig.to_dict()`` where it is one of ours."""
    if not isinstance(value, dict):
        return value
    try:
        return load_config(value).to_dict()
    except (TypeError, ValueError):
        return value  # a peer's settings


def reasons(value: Any) -> Any:
    """The reasons of the null fields, without those of timing fields."""
    return {k: v for k, v in (value or {}).items() if k not in TIMING}


def compare(before: dict[str, Any], after: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(differences of shared fields, fields only one side has) of one method's two records."""
    diffs, extra = [], []
    for key in sorted(set(before) | set(after)):
        if key in TIMING:
            continue
        if key not in before or key not in after:
            extra.append(f"{key} only {'after' if key in after else 'before'}")
            continue
        old, new = before[key], after[key]
        if key == "config":
            old, new = config(old), config(new)
        elif key == "reasons":
            old, new = reasons(old), reasons(new)
        if old != new:
            diffs.append(f"{key}: {json.dumps(old)[:160]} -> {json.dumps(new)[:160]}")
    return diffs, extra


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before")
    parser.add_argument("after")
    args = parser.parse_args()
    old, new = methods(args.before), methods(args.after)
    failed = sorted(set(old) ^ set(new))
    if failed:
        print(f"methods on one side only: {failed}")
    shared = [n for n in old if n in new]
    fields = 0
    for name in shared:
        diffs, extra = compare(old[name], new[name])
        if "label" in new[name] and "label" not in old[name]:  # the report's names: stored now, computed before
            shown = {k: describe(old[name])[k] for k in ("label", "variant", "colour")}
            diffs += [f"{k} (report): {v!r} -> {new[name][k]!r}" for k, v in shown.items() if new[name][k] != v]
        fields += len(set(old[name]) & set(new[name]) - TIMING)
        for line in diffs:
            print(f"DIFF {name}: {line}")
        if extra:
            print(f"note {name}: {', '.join(extra)}")
        failed += [name] if diffs else []
    print(f"{len(shared)} methods, {fields} shared non-timing fields compared: "
          f"{'IDENTICAL' if not failed else f'{len(failed)} differ: {failed}'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
