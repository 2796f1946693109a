"""Shared fixtures: a throwaway third-party plugin distribution and a clean plugin manager."""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent


def install_plugin(site: Path, module: str, source: str, dist: str, version: str = "0.1") -> None:
    """Make ``site`` hold an 'installed' plugin: ``module``.py with ``source`` and a dist-info declaring it as
    the entry point named after the distribution ``dist`` (``-`` → ``_``, without ``robbench-``)."""
    (site / f"{module}.py").write_text(source)
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    entry = dist.removeprefix("robbench-").replace("-", "_")
    (info / "entry_points.txt").write_text(f"[robbench]\n{entry} = {module}\n")


def install_thirdparty(site: Path) -> Path:
    """Make ``site`` hold an 'installed' third-party plugin: module + .dist-info with its entry point."""
    site.mkdir(parents=True, exist_ok=True)
    shutil.copy(HERE / "thirdparty_plugin.py", site / "robbench_tp_demo.py")
    info = site / "robbench_tp_demo-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: robbench-tp-demo\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[robbench]\ntp_demo = robbench_tp_demo\n")
    return site


@pytest.fixture
def thirdparty_path(tmp_path: Path) -> Path:
    """A directory that holds an 'installed' third-party plugin (see :func:`install_thirdparty`)."""
    return install_thirdparty(tmp_path / "site")


@pytest.fixture
def subprocess_env(thirdparty_path: Path, tmp_path: Path) -> dict[str, str]:
    """Environment for running the robbench CLI with the third-party plugin installed and a private cache."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(thirdparty_path), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["ROBBENCH_CACHE"] = str(tmp_path / "cache")
    return env


@pytest.fixture
def fresh_plugins(monkeypatch: pytest.MonkeyPatch, thirdparty_path: Path):
    """Reload the plugin manager in-process with the third-party plugin on sys.path; restore afterwards."""
    import robbench.plugins as plugins

    monkeypatch.syspath_prepend(str(thirdparty_path))
    monkeypatch.setattr(plugins, "_manager", None)
    monkeypatch.setattr(plugins, "_registries", None)
    # the fresh manager's failures and sources must not outlive it (evaluate() would warn about them later)
    monkeypatch.setattr(plugins, "_failures", [])
    monkeypatch.setattr(plugins, "_sources", dict(plugins._sources))
    monkeypatch.setattr(plugins, "_warned", set())
    yield plugins
    sys.modules.pop("robbench_tp_demo", None)


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op thread count set to n inside the block, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    """Tiny networks run fastest single-threaded (and do not fight other processes for the cores)."""
    with torch_threads(1):
        yield


@pytest.fixture
def two_threads():
    """Two intra-op threads (paths that split work across threads)."""
    with torch_threads(2):
        yield


@pytest.fixture
def miscounting_backend(fresh_plugins) -> str:
    """Registers backend ``test_miscount``: the torch reference with every point's count one lower, so its
    decisions differ; yields its name (the benchmarks' cross-backend checks must catch it)."""
    from robbench import hookimpl
    from robbench.backends import CountResult, TorchBackend

    class MiscountingBackend(TorchBackend):
        name = "test_miscount"
        description = "test: miscounts"
        auto_priority = None

        def count_within(self, *args, **kwargs) -> CountResult:
            res = super().count_within(*args, **kwargs)
            res.counts = (res.counts - 1).clamp(min=0)
            return res

    class MiscountPlugin:
        @hookimpl
        def register_backends(self, register):
            register(MiscountingBackend())

    plugin = MiscountPlugin()
    fresh_plugins.register_plugin(plugin, name="miscount-backend")
    try:
        yield MiscountingBackend.name
    finally:
        fresh_plugins.unregister_plugin(plugin)


def band_stats(err: str) -> tuple[int, int, int, int]:
    """(bf16 rows, refined, rechecked, refined units) summed over the kernel's ROBBENCH_BAND_STATS lines."""
    tot = [0, 0, 0, 0]
    for line in err.splitlines():
        if line.startswith("robbench bf16 band:"):
            f = line.split()
            for i, k in enumerate((4, 6, 8, 10)):
                tot[i] += int(f[k])
    return tuple(tot)


# --- the analytic model of the known-answer tests ---------------------------------------------------
@pytest.fixture(scope="module")
def model():
    """The default linear-Gaussian VAE (``robbench_plugins.analytic``: 1x8x8 inputs, closed-form p_r, margin
    and Theorem 1 bound), one per test module. A module that needs another model defines its own ``model``."""
    from robbench_plugins.analytic import LinearGaussianVAE

    return LinearGaussianVAE()


def copies(n: int) -> torch.Tensor:
    """(n, 1, 8, 8): n copies of the mid-grey point 0.5, the linear-Gaussian tests' input."""
    return torch.full((n, 1, 8, 8), 0.5)
