"""tune_cpu_allocator: argument checks, the effect it exists for (no page faults when a large tensor is
reallocated), and which CLI commands apply it."""

import platform
import subprocess
import sys

import pytest

from taylorseer import cli
from taylorseer.runtime import allocator

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


@pytest.mark.parametrize("field", ["mmap_threshold_bytes", "trim_threshold_bytes"])
@pytest.mark.parametrize("value", [-1, 2**31, 1.5, True, "1"])
def test_bad_threshold_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        allocator.tune_cpu_allocator(**{field: value})


_FAULTS = """
import resource, statistics, torch
def faults_per_alloc():
    counts = []
    for _ in range(7):
        start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.ones(16 << 20).sum()  # 64 MiB, above glibc's largest dynamic mmap threshold (32 MiB)
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
    return statistics.median(counts)
before = faults_per_alloc()
from taylorseer.runtime.allocator import tune_cpu_allocator
setting = tune_cpu_allocator()
print(before, faults_per_alloc(), setting["mmap_threshold_bytes"])
"""


@pytest.mark.skipif(not GLIBC, reason="mallopt thresholds are a glibc feature")
@pytest.mark.slow
def test_tuning_removes_page_faults_of_reallocation():
    out = subprocess.run([sys.executable, "-c", _FAULTS], capture_output=True, text=True, check=True).stdout.split()
    before, after, mmap_threshold = float(out[0]), float(out[1]), int(out[2])
    if mmap_threshold < 64 << 20:
        pytest.skip(f"this glibc caps the mmap threshold at {mmap_threshold} bytes, below the test's 64 MiB tensor")
    assert before > 10_000  # 64 MiB = 16,384 pages, mapped afresh on every allocation by default
    assert after < 100  # median over 7 allocations: the first one after tuning still grows the heap


@pytest.mark.parametrize("argv, tuned", [
    (["generate", "--model", "/nonexistent/pipeline"], True),
    (["--default-malloc", "generate", "--model", "/nonexistent/pipeline"], False),
    (["plan", "--preset", "fora"], False),
])
def test_cli_tunes_only_commands_that_run_models(monkeypatch, argv, tuned):
    calls = []
    monkeypatch.setattr(allocator, "tune_cpu_allocator", lambda: calls.append(1))
    cli.main(argv)
    assert bool(calls) == tuned
