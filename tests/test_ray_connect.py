"""`--executor ray` with an address where no Ray runs: exit 2 at once with what to do. In its own module so
that no module-scoped Ray of tests/test_ray_executor.py is running (`auto` joins any Ray it finds)."""
from __future__ import annotations

import pytest

ray = pytest.importorskip("ray")


# Session 9 outside review: `--ray-address HOST:PORT` with nothing listening there retried for minutes
# (killed at 200 s, still retrying), and `--ray-address auto` with no Ray running ended in a traceback
# (Ray's ConnectionError is an OSError, which the CLI re-raised). Both now exit 2 at once with what to do.
def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("address, message", [
    ("127.0.0.1:{port}", r"cannot reach a Ray cluster at 127\.0\.0\.1:\d+ .*ray start --head --port=\d+"),
    ("auto", r"--ray-address auto found no running Ray on this machine.*ray start --head"),
])
def test_an_unreachable_ray_address_exits_2_with_what_to_do(tmp_path, address, message):
    import os
    import re
    import subprocess
    import sys

    if address == "auto" and (ray.is_initialized() or ray._private.services.find_gcs_addresses()):
        pytest.skip("a Ray is running on this machine: auto would join it")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(TMPDIR=str(tmp_path), ROBBENCH_CACHE=str(tmp_path / "cache"))  # no cluster file in a fresh temp dir
    proc = subprocess.run([sys.executable, "-m", "robbench", "run", "--dataset", "digits", "--models", "vae",
                           "--estimators", "encoder_stats", "--points", "1", "--epochs", "1", "--executor", "ray",
                           "--ray-address", address.format(port=_closed_port()), "--out", str(tmp_path / "run"),
                           "--no-progress"], env=env, capture_output=True, text=True, timeout=120)
    err = " ".join(proc.stderr.split())
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert re.search(message, err), err[-2000:]
