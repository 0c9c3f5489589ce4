"""setup.py's own checks, run without building anything."""
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run_setup(setuptools_version, *argv):
    # setup.py with setuptools reporting another version; it must stop before setup() builds.
    code = ("import runpy, sys, setuptools; setuptools.__version__ = sys.argv[1]; "
            "sys.argv = ['setup.py'] + sys.argv[2:]; runpy.run_path('setup.py', run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code, setuptools_version, *argv], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


def test_editable_install_refuses_setuptools_before_64():
    # Before 64 pip runs `setup.py develop`, which would leave out fastcl.kernels silently.
    proc = _run_setup("58.1.0", "develop")
    assert proc.returncode != 0
    assert "fastcl's editable install needs setuptools >= 64 (found 58.1.0)" in proc.stderr


def test_other_commands_pass_the_check():
    proc = _run_setup("58.1.0", "--name")
    assert proc.returncode == 0 and proc.stdout.strip().endswith("fastcl"), proc.stderr[-2000:]
