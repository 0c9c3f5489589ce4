"""Every CUDA source under csrc/ must compile with the machine's nvcc (no GPU needed).

Generic: it picks up each ``csrc/**/*.cu`` as it appears, for sm_80 (A100) and sm_90 (H100)."""
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CU_FILES = sorted(ROOT.glob("csrc/**/*.cu"))
NVCC = shutil.which("nvcc")


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
@pytest.mark.skipif(not CU_FILES, reason="no .cu sources yet")
@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
@pytest.mark.parametrize("source", CU_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_nvcc_compiles(source, arch, tmp_path):
    cmd = [NVCC, "-c", f"-arch={arch}", "-std=c++17", "-O3", str(source), "-o", str(tmp_path / "out.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    assert (tmp_path / "out.o").stat().st_size > 0
