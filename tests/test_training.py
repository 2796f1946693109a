"""Training loop and checkpoint cache: determinism, caching, early stopping, ready-built and file models,
and the paper's trends (Theorem 2: sigma grows with beta; sigma offset >= tau) on embedded MNIST."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from robbench import training
from robbench.protocols import DataOptions, SplitData
from robbench.training import TrainConfig, train_or_load
from robbench_plugins import datasets, models

CPU = torch.device("cpu")
FAMILIES = {f.name: f for f in models.families()}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def small() -> SplitData:
    d = datasets.load_digits(DataOptions(seed=0))
    return SplitData(d.train_x[:256], d.train_y[:256], d.test_x[:64], d.test_y[:64])


def params(name: str, **overrides) -> dict:
    family = FAMILIES[name]
    p = {k: (v[-1] if k in family.sweep and isinstance(v, list) else v) for k, v in family.defaults.items()}
    return {**p, "latent_dim": 3, "hidden": 32, **overrides}


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_training_is_deterministic_cached_and_retrainable(small, tmp_path):
    fam, p, cfg = FAMILIES["vae"], params("vae"), TrainConfig(epochs=2, batch_size=64, seed=3)
    first = train_or_load(fam, p, small, cfg, cache_dir=tmp_path, device=CPU, progress=False)
    assert not first.from_cache and first.path.is_file() and math.isfinite(first.test_elbo)
    assert len(first.history) == 2 and first.train_seconds > 0
    assert not first.model.training and not any(q.requires_grad for q in first.model.parameters())

    cached = train_or_load(fam, p, small, cfg, cache_dir=tmp_path, device=CPU, progress=False)
    assert cached.from_cache and cached.cache_key == first.cache_key
    assert same_weights(cached.model, first.model) and cached.test_elbo == first.test_elbo

    again = train_or_load(fam, p, small, cfg, cache_dir=tmp_path, device=CPU, progress=False, retrain=True)
    assert not again.from_cache and same_weights(again.model, first.model)  # same seed, same weights
    assert again.test_elbo == first.test_elbo

    other = train_or_load(fam, p, small, TrainConfig(epochs=2, batch_size=64, seed=4), cache_dir=tmp_path,
                          device=CPU, progress=False)
    assert not other.from_cache and not same_weights(other.model, first.model)
    assert sorted(f.suffix for f in tmp_path.iterdir()) == [".pt", ".pt"]  # no temporary files left


def test_cache_key_covers_family_params_data_and_config(small):
    fam, p, cfg = FAMILIES["beta_vae"], params("beta_vae", beta=1.0), TrainConfig()
    key = training.cache_key(fam, p, small, cfg)
    assert key == training.cache_key(fam, p, small, TrainConfig(threads=None))  # threads do not change weights
    assert key == training.cache_key(fam, dict(reversed(list(p.items()))), small, cfg)  # order-free
    changed_data = SplitData(small.train_x.clone(), small.train_y, small.test_x, small.test_y)
    changed_data.train_x[0, 0, 0, 0] += 0.5
    assert len({key,
                training.cache_key(FAMILIES["vae"], p, small, cfg),
                training.cache_key(fam, {**p, "beta": 10.0}, small, cfg),
                training.cache_key(fam, p, small, TrainConfig(epochs=3)),
                training.cache_key(fam, p, small, TrainConfig(seed=1)),
                training.cache_key(fam, p, changed_data, cfg),
                training.cache_key(fam, p, small, cfg, dataset_name="digits")}) == 7


def test_checkpoint_loads_with_weights_only_and_rebuilds(small, tmp_path):
    fam, p = FAMILIES["sigma_offset_vae"], params("sigma_offset_vae", tau=0.5)
    trained = train_or_load(fam, p, small, TrainConfig(epochs=1), cache_dir=tmp_path, device=CPU, progress=False)
    ckpt = torch.load(trained.path, weights_only=True)
    assert ckpt["family"] == "sigma_offset_vae" and ckpt["params"]["tau"] == 0.5
    assert ckpt["input_shape"] == [1, 8, 8] and ckpt["meta"]["test_elbo"] == trained.test_elbo
    model, meta = training.load_checkpoint_file(trained.path, FAMILIES.get)
    x = small.test_x[:5]
    for got, want in zip(model.encode(x), trained.model.encode(x)):
        torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="shape"):
        training.load_checkpoint_file(trained.path, FAMILIES.get, expected_input_shape=(1, 28, 28))


def test_from_file_family_loads_a_robbench_checkpoint(small, tmp_path):
    trained = train_or_load(FAMILIES["ae"], params("ae"), small, TrainConfig(epochs=1), cache_dir=tmp_path,
                            device=CPU, progress=False)
    family = FAMILIES["from_file"]
    family.validate({"path": str(trained.path)})
    model = family.build({"path": str(trained.path)}, (1, 8, 8))
    x = small.test_x[:4]
    torch.testing.assert_close(model.decode(model.encode(x)[0]), trained.model.decode(trained.model.encode(x)[0]))
    result = train_or_load(family, {"path": str(trained.path)}, small, TrainConfig(), cache_dir=tmp_path,
                           device=CPU, progress=False)
    assert not result.from_cache and result.test_elbo == pytest.approx(trained.test_elbo, rel=1e-6)


def test_corrupt_cache_file_is_retrained_with_a_warning(small, tmp_path):
    fam, p, cfg = FAMILIES["vae"], params("vae"), TrainConfig(epochs=1)
    first = train_or_load(fam, p, small, cfg, cache_dir=tmp_path, device=CPU, progress=False)
    first.path.write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning, match="retraining"):
        again = train_or_load(fam, p, small, cfg, cache_dir=tmp_path, device=CPU, progress=False)
    assert not again.from_cache and same_weights(again.model, first.model)


def test_ready_built_family_is_not_trained_or_cached(small, tmp_path):
    fam = FAMILIES["linear_gaussian"]
    result = train_or_load(fam, dict(fam.defaults), small, TrainConfig(), cache_dir=tmp_path, device=CPU,
                           progress=False)
    assert not result.from_cache and result.train_seconds == 0.0 and result.path is None
    assert math.isfinite(result.test_elbo) and not any(tmp_path.iterdir())


class ScriptedModel(nn.Module):
    """A toy whose evaluation ELBO follows a script by epoch, and whose weight moves by -lr per Adam step."""

    input_shape = (1, 8, 8)
    latent_dim = 1

    def __init__(self, script: list[float], steps_per_epoch: int):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.script, self.steps_per_epoch, self.steps = script, steps_per_epoch, 0

    def loss(self, x):
        if self.training:
            self.steps += 1
            return self.w * 1.0, {"elbo": 0.0}
        epoch = self.steps // self.steps_per_epoch - 1
        return self.w * 0.0, {"elbo": self.script[min(epoch, len(self.script) - 1)]}


def test_early_stopping_keeps_the_best_epoch(small):
    # 256 training images with patience: 10% held out for validation -> 231 train, 4 steps of 64
    model = ScriptedModel([1.0, 3.0, 2.0, 2.5, 9.0, 9.0], steps_per_epoch=4)
    cfg = TrainConfig(epochs=6, batch_size=64, lr=0.01, patience=2)
    _, history = training.train_model(model, small, cfg, device=CPU, progress=False)
    assert history == [1.0, 3.0, 2.0, 2.5]  # epochs 2 and 3 do not beat epoch 1: stop
    # constant gradient 1: every Adam step moves w by lr, so after the best epoch (1) w = -8 lr
    assert model.w.item() == pytest.approx(-0.08, rel=1e-3)


def test_train_config_validation():
    with pytest.raises(ValueError, match="epochs=0"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="patience=0"):
        TrainConfig(patience=0)


def test_mnist_sigma_grows_with_beta_and_offset_floors_sigma(tmp_path):
    """Theorem 2 on real digits: the mean encoder sigma increases with beta; sigma + tau >= tau."""
    full = datasets.load_mnist(DataOptions(seed=0))
    data = SplitData(full.train_x[:2000], full.train_y[:2000], full.test_x[:500], full.test_y[:500])
    cfg = TrainConfig(epochs=6, batch_size=64, lr=3e-3, seed=0)
    mean_sigma = {}
    for beta in (0.1, 1.0, 10.0):
        p = {**FAMILIES["beta_vae"].defaults, "beta": beta}
        trained = train_or_load(FAMILIES["beta_vae"], p, data, cfg, cache_dir=tmp_path, device=CPU,
                                progress=False)
        mean_sigma[beta] = float(trained.model.encode(data.test_x)[1].mean())
    assert mean_sigma[0.1] * 1.5 < mean_sigma[1.0] and mean_sigma[1.0] * 1.5 < mean_sigma[10.0], mean_sigma
    p = {**FAMILIES["sigma_offset_vae"].defaults, "tau": 0.5}
    offset = train_or_load(FAMILIES["sigma_offset_vae"], p, data, cfg, cache_dir=tmp_path, device=CPU,
                           progress=False)
    assert float(offset.model.encode(data.test_x)[1].min()) >= 0.5


def test_early_stopping_epochs_are_stored_with_the_checkpoint_and_reported(small, tmp_path):
    """How long a model trained is kept: epochs budget, epochs actually run, the epoch whose weights were
    kept. In the checkpoint's metadata (read back from the cache, and derived for checkpoints written
    before it was stored), in the console line, and in the report's per-run table."""
    from types import SimpleNamespace

    from robbench.paper.report import _epochs_trained
    from robbench.prepare import describe_prepared
    from robbench.protocols import ModelFamily

    family = ModelFamily(name="scripted", description="test",
                         build=lambda p, s: ScriptedModel([1.0, 3.0, 2.0, 2.5, 9.0, 9.0], steps_per_epoch=4))
    cfg = TrainConfig(epochs=6, batch_size=64, lr=0.01, patience=2)
    trained = train_or_load(family, {}, small, cfg, cache_dir=tmp_path, device=CPU, progress=False)
    assert (trained.epochs, trained.epochs_trained, trained.best_epoch) == (6, 4, 2)
    meta = training.read_checkpoint(trained.path)["meta"]
    assert (meta["epochs"], meta["epochs_trained"], meta["best_epoch"], meta["stopped_early"]) == (6, 4, 2, True)
    cached = train_or_load(family, {}, small, cfg, cache_dir=tmp_path, device=CPU, progress=False)
    assert cached.from_cache and (cached.epochs, cached.epochs_trained, cached.best_epoch) == (6, 4, 2)
    payload = training.read_checkpoint(trained.path)  # as an older release wrote it: history only
    for key in ("epochs", "epochs_trained", "best_epoch", "stopped_early"):
        del payload["meta"][key]
    training.write_checkpoint(trained.path, payload)
    old = train_or_load(family, {}, small, cfg, cache_dir=tmp_path, device=CPU, progress=False)
    assert old.from_cache and (old.epochs, old.epochs_trained, old.best_epoch) == (6, 4, 2)
    # without early stopping every epoch runs and the last one's weights are kept
    assert training.epochs_summary([1.0, 3.0, 2.0], TrainConfig(epochs=3)) == \
        {"epochs": 3, "epochs_trained": 3, "best_epoch": 3, "stopped_early": False}

    line = describe_prepared({"train_seconds": 1.25, "test_elbo": -80.0, "epochs": 6, "epochs_trained": 4,
                              "best_epoch": 2})
    assert line == ("trained in 1.2s (4 of 6 epochs; early stopping kept the weights of epoch 2), "
                    "test ELBO -80.0 nats")
    full = describe_prepared({"train_seconds": 1.25, "test_elbo": -80.0, "epochs": 6, "epochs_trained": 6,
                              "best_epoch": 6})
    assert full == "trained in 1.2s, test ELBO -80.0 nats"  # the usual line when every epoch ran

    run_a, run_b = tmp_path / "a", tmp_path / "b"
    data = SimpleNamespace(models={"m1": {"epochs": 60, "epochs_trained": 12}, "m2": {"epochs": 60, "epochs_trained": 31},
                                   "m3": {"epochs": 15, "epochs_trained": 15}, "m4": {"test_elbo": -1.0}},
                           model_dirs={"m1": run_a, "m2": run_a, "m3": run_b, "m4": tmp_path / "c"})
    assert _epochs_trained(data, run_a) == "12-31 of 60"
    assert _epochs_trained(data, run_b) == "15"
    assert _epochs_trained(data, tmp_path / "c") == "—"


def test_models_table_records_the_epochs_trained(tmp_path, monkeypatch):
    """`robbench train` with early stopping: the run's models table holds epochs, epochs_trained and
    best_epoch for each trained model."""
    from robbench.cli import main
    from robbench.store import ResultStore

    monkeypatch.setenv("ROBBENCH_CACHE", str(tmp_path / "cache"))
    config = tmp_path / "c.yaml"
    config.write_text("train: {epochs: 3, patience: 1, batch_size: 256}\n"
                      "model_params: {vae: {latent_dim: 2, hidden: 16}}\n")
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "--dataset", "digits", "--models", "vae", "--out", str(out),
                 "--no-progress"]) == 0
    store = ResultStore.open_existing(out)
    (info,) = store.models().values()
    store.close()
    assert info["epochs"] == 3 and 1 <= info["epochs_trained"] <= 3
    assert 1 <= info["best_epoch"] <= info["epochs_trained"]


def test_a_checkpoint_write_that_fails_half_way_raises_its_cause_and_keeps_the_old_file(tmp_path, monkeypatch):
    """write_checkpoint streams torch.save into the temporary (it used to serialise into memory first: twice
    the weights). A write that fails half-way (disk full) still raises the OSError that says so, not
    torch's "unexpected pos", leaves no temporary, and the previous checkpoint stays whole."""
    import errno
    import os

    payload = {"format": training.CHECKPOINT_FORMAT, "state_dict": {"w": torch.arange(50_000.0)}}
    path = tmp_path / "ckpt.pt"
    training.write_checkpoint(path, payload)
    before = path.read_bytes()
    real_fdopen = os.fdopen

    class FullDisk:
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, data):
            if self.written + len(data) > 10_000:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.written += len(data)
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(os, "fdopen", lambda fd, mode: FullDisk(real_fdopen(fd, mode)))
    with pytest.raises(OSError) as caught:
        training.write_checkpoint(path, {**payload, "state_dict": {"w": torch.zeros(50_000)}})
    assert caught.value.errno == errno.ENOSPC
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]
    monkeypatch.undo()
    assert torch.equal(training.read_checkpoint(path)["state_dict"]["w"], torch.arange(50_000.0))
