"""Peak-memory sampling counts the whole process tree, cheaply."""

import subprocess
import sys
import time

import numpy as np
import pytest

from czb.evaluation import resources


def test_tree_rss_matches_psutil_for_a_child():
    code = "import sys, numpy as np; a = np.ones(40 * 2**20 // 8); print('ready', flush=True); sys.stdin.read()"
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        ours, theirs = resources.tree_rss()(), resources._psutil_tree_rss()
        # both include the child's 40 MiB array; allocations in between differ by little
        assert abs(ours - theirs) < 8 * 2**20
        assert resources._proc_rss(child.pid) >= 40 * 2**20
    finally:
        child.communicate("")


@pytest.mark.skipif(resources.tree_rss() is not resources._proc_tree_rss, reason="kernel lists no children")
def test_proc_walk_finds_grandchildren():
    code = (
        "import subprocess, sys; "
        "g = subprocess.Popen([sys.executable, '-c', 'import sys; print(1, flush=True); sys.stdin.read()'],"
        " stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True); "
        "g.stdout.readline(); print(g.pid, flush=True); sys.stdin.read(); g.communicate('')"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        grandchild = int(child.stdout.readline())
        assert resources._proc_children(child.pid) == [grandchild]
        assert child.pid in resources._proc_children(resources.os.getpid())
    finally:
        child.communicate("")


def test_measure_sees_a_transient_peak():
    with resources.measure(interval_s=0.01) as usage:
        before = resources._proc_rss(resources.os.getpid())  # other tests' workers may come and go
        block = np.ones(200 * 2**20 // 8)
        block[::512] += 1  # touch every page
        time.sleep(0.1)
        del block
    assert usage.peak_memory_mb >= before / 2**20 + 150
    assert usage.runtime_s >= 0.1
