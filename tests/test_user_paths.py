"""What a demanding new user's pass over the user paths found (session 8), one test per finding.

Each case failed before its fix, on real input: the console script itself, real data files, real runs
of the analytic linear-Gaussian VAE (no training) on the 8x8 digits.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from robbench.cli import main

FAST = ["--dataset", "digits", "--models", "linear_gaussian", "--points", "2", "--no-progress", "--backend", "torch"]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ROBBENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# --- Ctrl-C while the command is still importing torch ------------------------------------------
# The console script imported robbench.cli, and with it torch (~1.5 s), before main() could catch
# Ctrl-C: an interrupt in that window printed a KeyboardInterrupt traceback from deep inside torch.
_INTERRUPT_TORCH_IMPORT = textwrap.dedent("""
    import sys
    from importlib.metadata import entry_points

    class Interrupt:  # Ctrl-C arriving while `import torch` runs, wherever that import comes from
        def find_spec(self, name, path=None, target=None):
            if name == "torch":
                raise KeyboardInterrupt
            return None

    sys.meta_path.insert(0, Interrupt())
    sys.argv = ["robbench", *sys.argv[1:]]
    if sys.argv[1:2] == ["-m"]:
        import runpy
        sys.argv = ["robbench", *sys.argv[2:]]
        runpy.run_module("robbench", run_name="__main__")
    else:  # exactly what the installed console script runs
        (script,) = [ep for ep in entry_points(group="console_scripts") if ep.name == "robbench"]
        sys.exit(script.load()())
""")


@pytest.mark.parametrize("how", ["console-script", "python-m"])
def test_ctrl_c_while_torch_imports_exits_130_without_a_traceback(how, tmp_path):
    args = ["run", "--models", "beta_vae", "--dry-run"]
    # cwd: not the checkout, whose stale robbench.egg-info (if a legacy build left one) would shadow the
    # installed entry points
    done = subprocess.run([sys.executable, "-c", _INTERRUPT_TORCH_IMPORT, *(["-m"] if how == "python-m" else []),
                           *args], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 130, done.stderr
    assert done.stderr.strip() == ("robbench: interrupted; the results stored so far are kept: rerun the same "
                                   "command to resume")


def _console_script() -> str | None:
    here = Path(sys.executable).parent
    return next((str(here / n) for n in ("robbench", "robbench.exe") if (here / n).is_file()), None)


def _maps_torch(pid: int) -> bool:
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/maps")
def test_a_real_sigint_during_the_import_of_torch_exits_130_quietly(tmp_path):
    """A real SIGINT sent as soon as torch's libraries are mapped into the console script (its import
    then runs for about another second)."""
    script = _console_script()
    if script is None:
        pytest.skip("no robbench console script next to the interpreter")
    env = {**os.environ, "ROBBENCH_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen([script, "plugins"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 60
    while not _maps_torch(proc.pid) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert "Traceback" not in err, err
    assert proc.returncode == 130, err
    assert err.strip() == "robbench: interrupted"
