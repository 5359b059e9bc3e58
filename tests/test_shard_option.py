"""conftest's ``--shard FILE:I/N`` (tests/run_gpu.sh splits its heaviest files with it): the shards
of a file are disjoint and cover it, other files are untouched, a bad spec is a usage error."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FILES = ["tests/test_math.py", "tests/test_backend.py"]


def _collect(*args: str) -> tuple[int, list[str]]:
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           *FILES, *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    return proc.returncode, [line for line in proc.stdout.splitlines() if "::" in line]


def test_shards_partition_one_file_and_leave_the_others():
    rc, everything = _collect()
    assert rc == 0
    sharded = [t for t in everything if t.startswith(FILES[0])]
    others = [t for t in everything if not t.startswith(FILES[0])]
    assert len(sharded) >= 3 and others
    parts = []
    for i in range(3):
        rc, got = _collect(f"--shard=test_math.py:{i}/3")
        assert rc == 0
        assert [t for t in got if not t.startswith(FILES[0])] == others
        parts.append([t for t in got if t.startswith(FILES[0])])
        assert parts[-1] == sharded[i::3]  # every third test, in collection order
    assert sorted(sum(parts, [])) == sorted(sharded)


def test_bad_shard_spec_is_a_usage_error():
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           FILES[0], "--shard=test_math.py:3/3"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 4 and "expected FILE:I/N" in proc.stderr
