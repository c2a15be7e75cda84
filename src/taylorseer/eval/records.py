"""Bench records on disk: appending one JSON line durably, and reading one run of a JSONL file back.

Each line is written with one write, then flushed and ``fsync``-ed, so a killed process leaves at most one
partial last line (no closing newline, invalid JSON); the next run first ends such a line with a newline so that
its own lines stay whole, and the reader skips the partial line with a warning. A run is framed by a ``run_start``
and, once every method is recorded, a ``run_end`` record (``eval.bench`` says what each holds).

Example:
    >>> run = read_run("runs/bench/records.jsonl")   # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Record = dict[str, Any]
LEGACY_SCHEMAS = ("taylorseer.bench/1",)  # written before run_start/run_end markers existed


class PartialRecordWarning(UserWarning):
    """A line of a records file is not a whole JSON record (a bench killed while writing it); it is skipped."""


class IncompleteRunError(ValueError):
    """The chosen run of a records file did not finish (no ``run_end`` record, or fewer records than it says)."""


@dataclass(frozen=True)
class BenchRun:
    """The method records of one bench run and whether the run finished.

    ``status`` is "complete" (a ``run_end`` record whose method count matches), "incomplete" (none, or a count
    that does not match: the bench was killed or failed part way) or "legacy" (written before run markers
    existed; reported as complete, its completeness unknown). ``detail`` says why in one line; ``planned`` is
    the method names the run set out to measure (None: not recorded).
    """

    path: Path
    run_id: str | None
    records: list[Record]
    status: str
    detail: str
    planned: list[str] | None = None

    @property
    def complete(self) -> bool:
        """True unless the run is known not to have finished (legacy runs count as complete)."""
        return self.status != "incomplete"


def _parse_lines(path: Path) -> list[Record]:
    """The JSON objects of a JSONL file, one per line; a line that is not one is skipped with a warning."""
    lines = path.read_bytes().decode("utf-8", errors="replace").split("\n")
    rows: list[Record] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:
            row, why = None, str(err)
        else:
            why = "not a JSON object"
        if isinstance(row, dict):
            rows.append(row)
            continue
        where = "its last line (no newline after it)" if number == len(lines) else f"line {number}"
        warnings.warn(f"{path}: skipping {where}: not a whole record, probably cut off by a killed bench ({why})",
                      PartialRecordWarning, stacklevel=3)
    return rows


def _classify(rows: list[Record]) -> tuple[str, str, list[str] | None]:
    """(status, detail, planned method names) of one run's rows; see ``BenchRun``."""
    methods = [r for r in rows if r.get("kind", "method") == "method"]
    start = next((r for r in rows if r.get("kind") == "run_start"), None)
    end = next((r for r in rows if r.get("kind") == "run_end"), None)
    planned = start.get("methods_planned") if start is not None else None
    if end is not None:
        if end.get("complete") is True and end.get("methods") == len(methods):
            return "complete", f"complete (run_end record: {len(methods)} methods)", planned
        return "incomplete", (f"its run_end record says {end.get('methods')} methods (complete: "
                              f"{end.get('complete')}) but the file holds {len(methods)}"), planned
    schemas = {r.get("schema") for r in methods}
    if start is None and (rows[0].get("run_id") is None or schemas <= {*LEGACY_SCHEMAS, None}):
        return "legacy", ("not recorded (written before run_end markers existed, schema "
                          f"{', '.join(sorted(str(s) for s in schemas))}); reported as complete"), planned
    of = f" of {len(planned)} planned" if planned is not None else ""
    return "incomplete", (f"no run_end record: {len(methods)}{of} methods recorded, the bench was interrupted or "
                          "failed"), planned


def read_run(path: str | os.PathLike, run_id: str | None = None, allow_incomplete: bool = False) -> BenchRun:
    """One bench run of a JSONL records file: ``run_id``'s, or the latest (the run of the file's last record).

    A run is complete when its ``run_end`` record is present and counts its method records. A run without one
    was killed or failed part way; it raises ``IncompleteRunError`` (naming the file and the run id) unless
    ``allow_incomplete``. Legacy records (schema "taylorseer.bench/1", written before the run markers existed,
    including the committed docs/results files) have no markers at all: such a run, like a file without run ids,
    is treated as complete, with ``status`` "legacy". A line that is not a whole JSON record (a trailing line cut
    off by a killed writer) is skipped with a ``PartialRecordWarning``.

    Example:
        >>> run = read_run("runs/bench/records.jsonl")   # doctest: +SKIP
        >>> run.status, len(run.records)                 # doctest: +SKIP
        ('complete', 68)
    """
    path = Path(path)
    rows = _parse_lines(path)
    if not rows:
        raise ValueError(f"no records in {path}")
    runs: dict[str | None, list[Record]] = {}
    for row in rows:
        runs.setdefault(row.get("run_id"), []).append(row)
    latest = run_id is None
    run_id = rows[-1].get("run_id") if latest else run_id
    if run_id not in runs:
        raise ValueError(f"{path}: no run {run_id!r}; runs in the file: {[k for k in runs if k is not None]}")
    status, detail, planned = _classify(runs[run_id])
    records = [r for r in runs[run_id] if r.get("kind", "method") == "method"]
    which = f"the latest run {run_id}" if latest else f"run {run_id}"
    if status == "incomplete" and not allow_incomplete:
        done = [k for k, v in runs.items() if k != run_id and _classify(v)[0] != "incomplete"]
        earlier = f"; the last complete run in the file is {done[-1]}" if done else ""
        raise IncompleteRunError(f"{path}: {which} is incomplete ({detail}); rerun the bench, or report it "
                                 f"marked INCOMPLETE with --allow-incomplete{earlier}")
    if not records:
        raise ValueError(f"{path}: {which} has no method records ({detail})")
    return BenchRun(path, run_id, records, status, detail, planned)


def read_records(path: str | os.PathLike, run_id: str | None = None, allow_incomplete: bool = False) -> list[Record]:
    """The method records of one bench run (``read_run(...).records``): ``run_id``'s, or the latest run's.

    Example:
        >>> records = read_records("runs/bench/records.jsonl")   # doctest: +SKIP
    """
    return read_run(path, run_id, allow_incomplete).records


def append_record(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append ``record`` to the JSONL file ``path`` as one line, durably: one write, flush, ``fsync``.

    A process killed during the write leaves at most a partial last line without its newline (never a shorter
    line that parses), which ``report.read_run`` skips with a warning.
    """
    line = (json.dumps(record, allow_nan=False) + "\n").encode("utf-8")
    with open(path, "ab") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def end_partial_line(path: Path) -> None:
    """If ``path`` ends inside a line (a killed writer), end that line so the next record starts a line of its own."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) != b"\n":
            f.write(b"\n")
            f.flush()
            os.fsync(f.fileno())
