"""Freed memory kept for reuse (mpinewton.memory): page faults counted in fresh processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mpinewton.config import JobConfig, RunConfig
from mpinewton.memory import MALLOC_ENV

ROOT = Path(__file__).resolve().parent.parent
#: Five arrays of 400 MB, each freed before the next: the minor page faults they cost
#: after a first one has been made and freed.
PROBE = """
import json, resource, sys
import numpy as np
from mpinewton.memory import reuse_freed_memory
kept = reuse_freed_memory() if sys.argv[1] == "reuse" else None
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
x = np.ones(50_000_000); del x
before = faults()
for _ in range(5):
    x = np.ones(50_000_000); del x
print(json.dumps({"kept": kept, "faults": faults() - before}))
"""


def _probe(mode, **env):
    clean = {k: v for k, v in os.environ.items() if k not in MALLOC_ENV}
    proc = subprocess.run([sys.executable, "-c", PROBE, mode], env={**clean, **env}, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="the allocator settings and the page faults counted are glibc's on "
                    "Linux; elsewhere reuse_freed_memory() leaves the allocator alone")
def test_reused_memory_makes_no_page_faults_where_fresh_blocks_do():
    """With the system's settings each 400 MB array is a fresh mmap: at least one fault
    per 2 MB huge page (200 an array), 97,656 with 4 KB pages. Kept, the five reuse
    the first one's pages: (almost) no faults."""
    plain, kept = _probe("plain"), _probe("reuse")
    assert plain["faults"] >= 5 * 200, plain
    assert kept["kept"] is True and kept["faults"] < 50, kept


#: Five arrays of 400 MB made and freed in a thread, after a first: its page faults.
THREAD_PROBE = """
import json, resource, sys, threading
import numpy as np
from mpinewton.memory import reuse_freed_memory, single_arena
one = single_arena() if sys.argv[1] == "one" else None
reuse_freed_memory()
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
out = {"one": one}
def work():
    x = np.ones(50_000_000); del x
    before = faults()
    for _ in range(5):
        x = np.ones(50_000_000); del x
    out["faults"] = faults() - before
thread = threading.Thread(target=work); thread.start(); thread.join()
print(json.dumps(out))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="glibc's arenas on Linux; elsewhere single_arena() does nothing")
def test_one_arena_lets_a_thread_reuse_freed_memory():
    """In a thread's own arena each 400 MB array is a fresh mmap even with freed memory
    kept; from the main arena (single_arena) the thread reuses the first one's pages."""
    clean = {k: v for k, v in os.environ.items()
             if k not in MALLOC_ENV and k != "MALLOC_ARENA_MAX"}
    runs = {}
    for mode in ("own", "one"):
        proc = subprocess.run([sys.executable, "-c", THREAD_PROBE, mode], env=clean, cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        runs[mode] = json.loads(proc.stdout)
    assert runs["own"]["faults"] >= 5 * 200, runs
    assert runs["one"]["one"] is True and runs["one"]["faults"] < 50, runs
    proc = subprocess.run([sys.executable, "-c", "from mpinewton.memory import single_arena;"
                           "print(single_arena())"], env={**clean, "MALLOC_ARENA_MAX": "2"},
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "False", proc.stderr


def test_glibcs_own_variables_leave_the_allocator_alone():
    """A user who set MALLOC_MMAP_MAX_ (and the like) has chosen: nothing changes."""
    probe = _probe("reuse", MALLOC_TRIM_THRESHOLD_="1000000")
    assert probe["kept"] is False


def test_the_job_key_turns_it_off(monkeypatch):
    from mpinewton.train import session

    calls = []
    monkeypatch.setattr("mpinewton.memory.reuse_freed_memory", lambda: calls.append(1) or True)
    assert session.configure_memory(JobConfig(run=RunConfig(reuse_memory=False))) is False
    assert calls == []
    assert session.configure_memory(JobConfig(run=RunConfig())) is True and calls == [1]
