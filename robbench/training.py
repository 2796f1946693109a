"""Training loop and checkpoint cache for trainable model families.

A checkpoint is cached under ``cache_dir`` by a hash of everything that determines the trained weights:
family name, parameters, a fingerprint of the data (shapes and contents), the train config (including
the seed) and :data:`CODE_VERSION`. Files are written atomically (temporary file, then ``os.replace``) and
read with ``torch.load(weights_only=True)``: a checkpoint is a plain dict of tensors and JSON-like values.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from robbench import faults, terminal
from robbench.locks import pid_alive
from robbench.protocols import ModelFamily, SplitData

# Bump when a change to training or to the built-in models changes what a given config trains to.
CODE_VERSION = "models-1"
CHECKPOINT_FORMAT = "robbench-checkpoint-1"


@dataclass
class TrainConfig:
    """epochs: budget (an upper bound when ``patience`` is set); batch_size, lr: Adam's;
    seed: weight init, shuffling and reparameterisation noise; patience: stop after this many epochs
    without a better validation ELBO (10% of the training set is then held out for validation) and
    keep the best weights; None trains for exactly ``epochs``. threads: CPU threads used while training
    (the small default models train fastest single-threaded, and then do not fight other processes for
    the cores; None keeps torch's setting). ``threads`` does not change the result, so it is not part of
    the cache key."""

    epochs: int = 15
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0
    patience: int | None = None
    threads: int | None = 1

    def __post_init__(self) -> None:
        for key in ("epochs", "batch_size"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ValueError(f"train config: {key}={getattr(self, key)!r} must be a positive integer")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"train config: lr={self.lr!r} must be a number > 0")
        if self.patience is not None and (not isinstance(self.patience, int) or self.patience < 1):
            raise ValueError(f"train config: patience={self.patience!r} must be a positive integer or null")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"train config: threads={self.threads!r} must be a positive integer or null")

    def hashed(self) -> dict[str, Any]:
        """The fields that determine the trained weights (what the cache key sees)."""
        return {k: v for k, v in asdict(self).items() if k != "threads"}


@dataclass
class TrainedModel:
    """model: in eval mode with parameters frozen (requires_grad False); test_elbo: mean per-example ELBO
    in nats on the test split (NaN when the model has no loss); history: per-epoch test ELBO (validation
    ELBO with early stopping); epochs / epochs_trained / best_epoch: see :func:`epochs_summary` (None for
    ready-built models)."""

    model: nn.Module
    test_elbo: float
    train_seconds: float
    from_cache: bool
    cache_key: str
    path: Path | None = None
    history: list[float] = field(default_factory=list)
    epochs: int | None = None
    epochs_trained: int | None = None
    best_epoch: int | None = None


def epochs_summary(history: list[float], cfg: TrainConfig | dict[str, Any]) -> dict[str, int | bool]:
    """How long a model trained, from its per-epoch scores: ``epochs`` (the budget), ``epochs_trained`` (the
    epochs actually run: fewer than the budget when early stopping stopped it), ``best_epoch`` (1-based epoch
    whose weights were kept: the first best validation ELBO with ``patience``, else the last epoch) and
    ``stopped_early``."""
    get = cfg.get if isinstance(cfg, dict) else lambda k, default=None: getattr(cfg, k, default)
    trained = len(history)
    best = (max(range(trained), key=lambda i: (history[i], -i)) + 1) if get("patience") and trained else trained
    budget = int(get("epochs", trained) or trained)
    return {"epochs": budget, "epochs_trained": trained, "best_epoch": best, "stopped_early": trained < budget}


# ---------------------------------------------------------------------------------------------
# Cache keys
# ---------------------------------------------------------------------------------------------
def data_fingerprint(data: SplitData) -> str:
    """sha256 of the split's shapes, labels and (a strided subset of at most ~2M) pixel values."""
    h = hashlib.sha256()
    for t in (data.train_x, data.train_y, data.test_x, data.test_y):
        if hasattr(t, "fingerprint"):  # lazily read images (robbench_plugins.imagedata): files, not pixels
            h.update(t.fingerprint().encode())
            continue
        flat = t.detach().reshape(-1)
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        step = max(1, flat.numel() // 2_000_000)
        h.update(flat[::step].contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def cache_key(family: ModelFamily, params: dict[str, Any], data: SplitData, cfg: TrainConfig,
              dataset_name: str = "") -> str:
    """Hex sha256 of the full training config (see module docstring)."""
    blob = json.dumps({
        "family": family.name,
        "params": params,
        "dataset": dataset_name,
        "train_size": int(data.train_x.shape[0]),
        "data": data_fingerprint(data),
        "train": cfg.hashed(),
        "code": CODE_VERSION,
    }, sort_keys=True, default=repr)
    return hashlib.sha256(blob.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Checkpoint files
# ---------------------------------------------------------------------------------------------
def save_checkpoint(path: Path, model: nn.Module, family: ModelFamily, params: dict[str, Any],
                    **meta: Any) -> None:
    """Atomically write a checkpoint dict (state dict + everything needed to rebuild the model)."""
    write_checkpoint(path, checkpoint_payload(model, family, params, **meta))


def checkpoint_payload(model: nn.Module, family: ModelFamily, params: dict[str, Any], **meta: Any) -> dict[str, Any]:
    """The checkpoint as a plain dict of CPU tensors and JSON values (what a file holds, and what a remote
    executor ships to its workers)."""
    return {
        "format": CHECKPOINT_FORMAT,
        "family": family.name,
        "params": json.loads(json.dumps(params)),  # plain JSON types: loadable with weights_only=True
        "input_shape": list(model.input_shape),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "meta": json.loads(json.dumps(meta, default=repr)),
    }


class _KeptErrorFile:
    """A file for ``torch.save`` that keeps the first OSError of its writes: torch's zip writer swallows it
    and raises its own "unexpected pos" RuntimeError, which names no cause."""

    def __init__(self, file: Any):
        self.file = file
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def flush(self) -> None:
        self.file.flush()


def write_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Atomically write a :func:`checkpoint_payload` to ``path`` (temporary file, then ``os.replace``),
    first removing temporaries that killed writers left in the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(path.parent)
    # The writer's pid is in the temporary's name, so a file left by a killed writer can be recognised.
    fd, tmp = tempfile.mkstemp(prefix=f"{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            sink = _KeptErrorFile(f)
            try:
                torch.save(payload, sink)  # streamed: no second copy of the weights in memory
            except Exception:
                if sink.error is not None:  # the cause (disk full, a file size limit), not torch's "unexpected pos"
                    raise sink.error from None
                raise
        faults.reached("checkpoint-save")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint file's payload (``weights_only=True``, CPU tensors); checks the format."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a robbench checkpoint (expected format {CHECKPOINT_FORMAT!r})")
    return ckpt
STALE_TMP_SECONDS = 24 * 3600  # a temporary this old is stale even if its pid now names another process


def clean_stale_temporaries(folder: Path) -> list[Path]:
    """Remove checkpoint temporaries (``<name>.<pid>.<random>.tmp``) whose writer is gone or that are older
    than a day (also older ones without a pid in the name). Returns what was removed."""
    removed = []
    now = time.time()
    for tmp in Path(folder).glob("*.tmp") if Path(folder).is_dir() else []:
        parts = tmp.name.split(".")
        pid = int(parts[-3]) if len(parts) >= 4 and parts[-3].isdigit() else None
        try:
            old = now - tmp.stat().st_mtime > STALE_TMP_SECONDS
        except FileNotFoundError:
            continue
        if old or (pid is not None and pid != os.getpid() and not pid_alive(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def load_checkpoint_file(path: str | os.PathLike, get_family: Callable[[str], ModelFamily], *,
                         expected_input_shape: tuple[int, ...] | None = None,
                         device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model from a robbench checkpoint (``weights_only=True``); returns (model in eval mode, meta).

    ``get_family(name)`` looks up the family that built it (e.g. ``get_registries().models.get``).
    """
    ckpt = read_checkpoint(path)
    input_shape = tuple(ckpt["input_shape"])
    if expected_input_shape is not None and tuple(expected_input_shape) != input_shape:
        raise ValueError(f"checkpoint {path} was trained on inputs of shape {input_shape}, "
                         f"but the data set has shape {tuple(expected_input_shape)}")
    return model_from_payload(ckpt, get_family, device=device)


def model_from_payload(payload: dict[str, Any], get_family: Callable[[str], ModelFamily], *,
                       device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model a :func:`checkpoint_payload` describes; returns (model in eval mode, meta)."""
    model = get_family(payload["family"]).build(payload["params"], tuple(payload["input_shape"]))
    model.load_state_dict(payload["state_dict"])
    model.to(device).eval()
    return model, dict(payload.get("meta", {}), family=payload["family"], params=payload["params"])


def checkpoint_path(family: ModelFamily, params: dict[str, Any], data: SplitData, cfg: TrainConfig, *,
                    cache_dir: Path, dataset_name: str = "") -> tuple[str, Path]:
    """(cache key, file) of a trainable family's checkpoint in ``cache_dir``."""
    key = cache_key(family, params, data, cfg, dataset_name)
    return key, Path(cache_dir) / f"{family.name}-{key[:20]}.pt"


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_elbo(model: nn.Module, x: Tensor, batch_size: int, device: torch.device) -> float:
    """Mean per-example one-sample ELBO (nats) over x, in batches; uses the global RNG for noise."""
    total, n = 0.0, 0
    for i in range(0, x.shape[0], batch_size):
        xb = x[i:i + batch_size].to(device)
        _, logs = model.loss(xb)
        total += batch_elbo(logs, xb.shape[0]) * xb.shape[0]
        n += xb.shape[0]
    return total / max(n, 1)


def _optional_test_elbo(family: ModelFamily, model: nn.Module, x: Tensor, device: torch.device) -> float:
    """A ready-built model's test ELBO (nats) when its ``loss(x)`` follows the protocol, else NaN with a
    warning: the ELBO is only reported for such models, and a ``loss`` of another signature or return (a
    user's own ``loss(x, recon, mu, logvar)``) must not fail the whole model, whose rows need none of it."""
    if not callable(getattr(model, "loss", None)):
        return math.nan
    try:
        return evaluate_elbo(model, x, 1024, device)
    except (TypeError, ValueError, KeyError) as err:  # the loss's signature or logs; not its arithmetic
        warnings.warn(f"model {family.name!r}: no test ELBO reported: its loss() is not loss(x) -> (objective, "
                      f"{{'elbo': ...}}) ({type(err).__name__}: {err}); the model is evaluated without it")
        return math.nan


def batch_elbo(logs: Any, batch: int) -> float:
    """The batch's mean ELBO (nats) from the logs ``model.loss(x)`` returned for ``batch`` examples.

    ``logs["elbo"]`` may be a number, a one-element tensor, or the (batch,) per-example ELBOs (a
    plugin's model returns whichever is natural); a tensor kept as it is would be stored as the text
    "tensor(...)" and a per-example vector would break the batch weighting."""
    if not isinstance(logs, dict) or "elbo" not in logs:
        raise TypeError(f"model.loss(x) must return (objective, logs) with logs a dict holding 'elbo' (the "
                        f"ELBO in nats, beta = 1); its logs are {type(logs).__name__}"
                        f"{' with keys ' + repr(sorted(map(str, logs))) if isinstance(logs, dict) else ''}")
    value = logs["elbo"]
    try:
        elbo = torch.as_tensor(value.detach() if isinstance(value, Tensor) else value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"model.loss(x)'s logs['elbo'] must be a number or a tensor, got "
                        f"{type(value).__name__} ({err})") from None
    if elbo.numel() == 1:
        return float(elbo)
    if tuple(elbo.shape) == (batch,):
        return float(elbo.mean())
    raise ValueError(f"model.loss(x)'s logs['elbo'] has shape {tuple(elbo.shape)} for {batch} examples; give "
                     f"the batch's mean ELBO (a number) or the per-example ELBOs, shape ({batch},)")


def _progress(enabled: bool, description: str):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]:>9.2f}  held-out ELBO {task.fields[elbo]:>9.2f}"),
                    TimeElapsedColumn(), console=terminal.console(), disable=not enabled, transient=False)


def train_model(model: nn.Module, data: SplitData, cfg: TrainConfig, *, device: torch.device,
                progress: bool = True, description: str = "train") -> tuple[float, list[float]]:
    """Train ``model`` in place (see :func:`_train_model`), with ``cfg.threads`` CPU threads."""
    before = torch.get_num_threads()
    if cfg.threads is not None and device.type == "cpu":
        torch.set_num_threads(min(cfg.threads, before))
    try:
        return _train_model(model, data, cfg, device=device, progress=progress, description=description)
    finally:
        torch.set_num_threads(before)


def _train_model(model: nn.Module, data: SplitData, cfg: TrainConfig, *, device: torch.device,
                 progress: bool, description: str) -> tuple[float, list[float]]:
    """Train ``model`` in place with Adam; returns (test ELBO, per-epoch test ELBOs).

    Deterministic given ``cfg.seed`` on CPU (the caller seeds weight initialisation; this function
    seeds shuffling and the reparameterisation noise). Does not change the global RNG state.
    """
    train_x = data.train_x
    val_x = data.test_x
    gen = torch.Generator().manual_seed(cfg.seed)
    if cfg.patience is not None:
        perm = torch.randperm(train_x.shape[0], generator=gen)
        n_val = max(1, train_x.shape[0] // 10)
        val_x, train_x = train_x[perm[:n_val]], train_x[perm[n_val:]]
    if hasattr(model, "dataset_size"):
        model.dataset_size = int(train_x.shape[0])
    model.to(device)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    history: list[float] = []
    best = (-math.inf, None, 0)  # (val ELBO, state dict, epoch)
    n = train_x.shape[0]
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed + 1)
        with _progress(progress, description) as bar:
            task = bar.add_task(description, total=cfg.epochs * steps_per_epoch, loss=math.nan, elbo=math.nan)
            for epoch in range(cfg.epochs):
                model.train()
                order = torch.randperm(n, generator=gen)
                for i in range(0, n, cfg.batch_size):
                    xb = train_x[order[i:i + cfg.batch_size]].to(device)
                    loss, _ = model.loss(xb)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    bar.update(task, advance=1, loss=loss.item())
                model.eval()
                score = evaluate_elbo(model, val_x, 1024, device)
                history.append(score)
                bar.update(task, elbo=score)
                if cfg.patience is not None:
                    if score > best[0]:
                        best = (score, copy.deepcopy(model.state_dict()), epoch)
                    elif epoch - best[2] >= cfg.patience:
                        break
            if best[1] is not None:
                model.load_state_dict(best[1])
            model.eval()
            test_elbo = evaluate_elbo(model, data.test_x, 1024, device)
    return test_elbo, history


def _freeze(model: nn.Module) -> nn.Module:
    model.eval()
    model.requires_grad_(False)  # attacks differentiate w.r.t. inputs only
    return model


def train_or_load(family: ModelFamily, params: dict[str, Any], data: SplitData, cfg: TrainConfig, *,
                  cache_dir: Path, device: torch.device, retrain: bool = False, progress: bool = True,
                  dataset_name: str = "") -> TrainedModel:
    """Return the trained model for (family, params, data, cfg), from the cache when present.

    ``params``: the family's defaults merged with overrides, one value per sweep key. Ready-built
    families (``trainable=False``) are built and evaluated, never trained or cached. ``retrain=True``
    trains even when a checkpoint exists (and overwrites it). The returned model is on ``device``, in
    eval mode, with parameters frozen.
    """
    device = torch.device(device)
    if family.validate is not None:
        family.validate(params)
    if not family.trainable:
        return build_or_train(family, params, data, cfg, device=device)[0]
    key, path = checkpoint_path(family, params, data, cfg, cache_dir=cache_dir, dataset_name=dataset_name)
    if path.is_file() and not retrain:
        try:
            trained = trained_from_payload(read_checkpoint(path), family, data, device=device, path=path)
            trained.cache_key = key
            return trained
        except Exception as err:  # a corrupt or stale file is retrained rather than fatal
            warnings.warn(f"could not load cached checkpoint {path} ({err}); retraining")
    trained, payload = build_or_train(family, params, data, cfg, device=device, progress=progress,
                                      dataset_name=dataset_name)
    try:
        write_checkpoint(path, payload)
    except OSError as err:  # the model is good; only the cache lost it (disk full?): use it uncached
        warnings.warn(f"could not cache the trained model at {path} ({err.strerror or err}); it is used for "
                      "this run only, and a later run trains it again: free space in the cache "
                      "($ROBBENCH_CACHE) to keep it")
        return trained
    trained.path = path
    return trained


def build_or_train(family: ModelFamily, params: dict[str, Any], data: SplitData, cfg: TrainConfig, *,
                   device: torch.device, progress: bool = True,
                   dataset_name: str = "") -> tuple[TrainedModel, dict[str, Any]]:
    """The model for (family, params, data, cfg) without touching the cache: a ready-built family is built
    and its test ELBO evaluated, a trainable one is trained. Returns (the model, frozen on ``device``, and
    its :func:`checkpoint_payload`, which a trainable family's cache file holds)."""
    device = torch.device(device)
    if family.validate is not None:
        family.validate(params)
    if not family.trainable:
        model = family.build(params, data.input_shape).to(device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            elbo = _optional_test_elbo(family, model, data.test_x, device)
        payload = checkpoint_payload(model, family, params, test_elbo=elbo, train_seconds=0.0, cache_key="")
        return TrainedModel(_freeze(model), elbo, 0.0, False, ""), payload

    key = cache_key(family, params, data, cfg, dataset_name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # weight initialisation
        model = family.build(params, data.input_shape)
    if not callable(getattr(model, "loss", None)):  # else an AttributeError from inside the training loop
        raise TypeError(f"model family {family.name!r} is trainable (ModelFamily's trainable defaults to True) but "
                        f"its {type(model).__name__} has no loss(x) -> (objective, {{'elbo': ...}}); add one, or "
                        "register a ready-built model with ModelFamily(..., trainable=False)")
    start = time.perf_counter()
    label = f"{family.name} " + " ".join(f"{k}={params[k]}" for k in family.sweep if k in params)
    test_elbo, history = train_model(model, data, cfg, device=device, progress=progress,
                                     description=label.strip())
    seconds = time.perf_counter() - start
    epochs = epochs_summary(history, cfg)
    payload = checkpoint_payload(model, family, params, test_elbo=test_elbo, train_seconds=seconds,
                                 history=history, train_config=asdict(cfg), dataset=dataset_name, cache_key=key,
                                 code_version=CODE_VERSION, **epochs)
    return TrainedModel(_freeze(model), test_elbo, seconds, False, key, None, history, epochs["epochs"],
                        epochs["epochs_trained"], epochs["best_epoch"]), payload


def trained_from_payload(payload: dict[str, Any], family: ModelFamily, data: SplitData, *,
                         device: torch.device | str, path: Path | None = None) -> TrainedModel:
    """A cached checkpoint as a :class:`TrainedModel` (``from_cache`` True), checked against the data's shape."""
    if tuple(payload["input_shape"]) != tuple(data.input_shape):
        raise ValueError(f"checkpoint was trained on inputs of shape {tuple(payload['input_shape'])}, "
                         f"but the data set has shape {tuple(data.input_shape)}")
    model, meta = model_from_payload(payload, lambda _name: family, device=device)
    history = list(meta.get("history", []))
    # checkpoints written before epochs were stored: derived from the history and the training settings
    epochs = {k: meta[k] for k in ("epochs", "epochs_trained", "best_epoch") if k in meta} or \
        (epochs_summary(history, meta.get("train_config") or {}) if history else {})
    return TrainedModel(_freeze(model), float(meta["test_elbo"]), float(meta["train_seconds"]), True,
                        str(meta.get("cache_key", "")), path, history, epochs.get("epochs"),
                        epochs.get("epochs_trained"), epochs.get("best_epoch"))
