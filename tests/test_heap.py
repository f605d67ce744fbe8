"""`retain_freed_blocks`: large blocks come from the heap inside it, from mmap outside (glibc).

Each scenario runs in a fresh interpreter: in the test session's own process an earlier test can
leave a large free hole in the heap (a freed block below a live one), and glibc serves a new block
from such a hole whatever its thresholds, so the "from mmap outside" checks would depend on the
tests run before."""
import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt thresholds are glibc's")

SRC = Path(__file__).resolve().parents[1] / "src"
SIZE = 64 << 20

PROBE = """
import ctypes, json, sys
sys.path.insert(0, sys.argv[1])
import torch
from actsparse.heap import retain_freed_blocks

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
size = int(sys.argv[2])

def mmapped_growth():
    before = libc.mallinfo2().hblkhd
    block = torch.empty(size, dtype=torch.uint8)
    grown = libc.mallinfo2().hblkhd - before
    del block
    return grown

growth = {}
"""

SCENARIOS = {
    "inside_and_after": """
growth["before"] = mmapped_growth()
with retain_freed_blocks():
    growth["inside"] = mmapped_growth()
growth["after"] = mmapped_growth()
""",
    "disabled": """
with retain_freed_blocks(enabled=False):
    growth["inside"] = mmapped_growth()
""",
    "raised": """
try:
    with retain_freed_blocks():
        raise RuntimeError("boom")
except RuntimeError:
    growth["after"] = mmapped_growth()
""",
}


def mmapped_growths(scenario: str) -> dict[str, int]:
    """Bytes by which glibc's mmapped total grows while a 64 MiB block is allocated, at each point
    of the scenario, in a new interpreter."""
    script = PROBE + SCENARIOS[scenario] + "print(json.dumps(growth))"
    done = subprocess.run([sys.executable, "-c", script, str(SRC), str(SIZE)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_large_blocks_leave_mmap_inside_and_return_after():
    growth = mmapped_growths("inside_and_after")
    assert growth["before"] >= SIZE
    assert growth["inside"] == 0
    assert growth["after"] >= SIZE


def test_disabled_changes_nothing():
    assert mmapped_growths("disabled")["inside"] >= SIZE


def test_thresholds_restored_when_the_block_raises():
    assert mmapped_growths("raised")["after"] >= SIZE
