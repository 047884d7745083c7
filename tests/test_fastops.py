import subprocess
import sys
import textwrap

import pytest
import torch

EPS = torch.finfo(torch.float32).eps


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_kept_memory_serves_a_freed_large_tensor_again_without_page_faults():
    """A 64 MiB tensor freed and allocated again: from fresh mmap pages (16,384 faults) by default, from the
    kept heap (none) once :func:`keep_freed_memory` applied. In a fresh process: the setting is process-wide."""
    code = textwrap.dedent("""
        import resource, sys, torch
        from raysim.fastops import keep_freed_memory
        applied = keep_freed_memory()
        def faults():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            x = torch.empty(16 << 20); x.fill_(1.0); del x
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        faults()
        print(applied, faults())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    if out[0] == "False":
        pytest.skip("not glibc")
    assert int(out[1]) < 1000  # 64 MiB is 16,384 pages of 4 KiB
