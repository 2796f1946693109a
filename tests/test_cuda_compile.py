"""The CUDA sources compile with nvcc wherever nvcc exists, even without a GPU, so they cannot rot.

A CPU-only torch ships the core ATen headers (but not c10/cuda), which is all csrc/cuda uses.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.utils.cpp_extension as ext

from robbench import kernels

NVCC = shutil.which("nvcc") or (os.path.join(ext.CUDA_HOME, "bin", "nvcc") if ext.CUDA_HOME else None)


@pytest.mark.skipif(not NVCC or not os.path.exists(NVCC), reason="nvcc not installed")
@pytest.mark.parametrize("source", kernels.cuda_sources(), ids=lambda p: p.name)
def test_cuda_source_compiles(source: Path, tmp_path: Path):
    includes = [f"-I{p}" for p in ext.include_paths()] + [f"-I{kernels.CSRC}"]
    cmd = [NVCC, "-std=c++20", "--fmad=false", "-c", str(source), "-o", str(tmp_path / "out.o"),
           "--expt-relaxed-constexpr", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", *includes]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "out.o").stat().st_size > 0


def test_there_are_cuda_sources():
    assert kernels.cuda_sources(), "csrc/cuda/*.cu missing"
