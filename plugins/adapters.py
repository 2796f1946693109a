"""Model adapters: users' own models as ready-built model families.

- ``diffusers_autoencoder_kl``: a diffusers ``AutoencoderKL`` (the autoencoder of latent diffusion
  models) from a local directory (``from_pretrained(path)``, safetensors weights only). mu, sigma are the
  posterior's mean and std flattened to (B, C_lat * h * w); g(z) = ``decode(z).sample``; inputs in
  [-1, 1] (declared as ``input_range``).
- ``pythae``: a pythae model saved with its own ``save()`` (``AutoModel.load_from_folder``). Folders
  whose encoder/decoder are custom networks hold them as pickles (``encoder.pkl``, ``decoder.pkl``):
  unpickling runs arbitrary code, so such a folder loads only with ``trust_pickled_code: true``
  (like ``trust_remote_code`` in transformers); without pickles the weights load with torch's
  ``weights_only`` loader.
- ``torch_module``: any ``module:callable`` returning an ``nn.Module`` that meets
  :class:`robbench.protocols.VAEModel`, with weights from a ``.safetensors`` file or a ``weights_only``
  checkpoint (a state dict).

The heavy libraries (diffusers, pythae, safetensors) are optional extras, imported only when a family is
built: ``pip install "robbench[models]"``. None of these models is an MLP stack, so the Monte Carlo
engine decodes them on its generic path (a ``torch_module`` whose ``decoder`` is a Linear/ReLU/Sigmoid
``nn.Sequential`` equal to ``decode`` still gets the fused kernel).
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import pickle
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from robbench.hookspecs import hookimpl
from robbench.protocols import ModelFamily

LOG_2PI = math.log(2 * math.pi)


def _require(module: str, extra: str = "models") -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"this model family needs {module!r}: pip install \"robbench[{extra}]\" ({err})") from None


def _gaussian_loglik(x: Tensor, recon: Tensor, sigma: float) -> Tensor:
    """sum_i log N(x_i; recon_i, sigma^2) per row: (B,)."""
    d = (x - recon).flatten(1)
    n = d.shape[1]
    return -0.5 * d.pow(2).sum(1) / sigma ** 2 - n * (math.log(sigma) + 0.5 * LOG_2PI)


def _check_installed(family: str, module: str, extra: str = "models") -> None:
    """Before any work: the optional package ``module`` can be imported (without importing it)."""
    if importlib.util.find_spec(module) is None:
        raise ValueError(f"model {family!r} needs {module!r}, which is not installed: pip install \"robbench[{extra}]\"")


def _from_cwd(path: str | Path) -> str:
    """`` (relative paths are read from the current directory, CWD)`` for a relative ``path``: a config file's
    paths are not read from the config file's folder, and a run started elsewhere misses them."""
    return "" if Path(path).expanduser().is_absolute() else \
        f" (relative paths are read from the current directory, {os.getcwd()})"


def _check_dir(family: str, path: Any) -> None:
    if not isinstance(path, str) or not path:
        raise ValueError(f"model {family!r}: parameter 'path' is required (a local directory)")
    if not Path(path).expanduser().is_dir():
        raise ValueError(f"model {family!r}: path={path!r} is not a directory{_from_cwd(path)}")


def _check_size(family: str, value: Any) -> None:
    if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        raise ValueError(f"model {family!r}: image_size={value!r} must be null or a positive integer")


def _check_sigma(family: str, value: Any) -> None:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0):
        raise ValueError(f"model {family!r}: obs_sigma={value!r} must be a number > 0")


# ---------------------------------------------------------------------------------------------
# diffusers AutoencoderKL
# ---------------------------------------------------------------------------------------------
class DiffusersAutoencoderKL(nn.Module):
    """A diffusers ``AutoencoderKL`` seen through the VAEModel protocol.

    x: (B, C, S, S) in [-1, 1]; mu, sigma: (B, k) with k = latent_channels * (S/f)^2 (f the
    downsampling factor); decode(z): (N, C, S, S). log p(x|z) is Gaussian with scale ``obs_sigma``.
    """

    input_range = (-1.0, 1.0)

    def __init__(self, vae: nn.Module, image_size: int, obs_sigma: float = 1.0):
        super().__init__()
        self.vae = vae  # not called "decoder": it is no MLP stack, the engine decodes it generically
        cfg = vae.config
        self.input_shape = (int(cfg.in_channels), int(image_size), int(image_size))
        factor = 2 ** (len(cfg.block_out_channels) - 1)
        if image_size % factor:
            raise ValueError(f"image_size={image_size} must be divisible by the autoencoder's downsampling "
                             f"factor {factor}")
        side = image_size // factor
        self.latent_shape = (int(cfg.latent_channels), side, side)
        self.latent_dim = math.prod(self.latent_shape)
        self.obs_sigma = float(obs_sigma)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: (B, C, S, S) in [-1, 1] -> posterior mean and std, each (B, k)."""
        posterior = self.vae.encode(x).latent_dist
        return posterior.mean.flatten(1), posterior.std.flatten(1)

    def decode(self, z: Tensor) -> Tensor:
        """z: (N, k) -> decode(z).sample, (N, C, S, S) (nominally in [-1, 1], not clamped)."""
        return self.vae.decode(z.view(-1, *self.latent_shape)).sample

    def log_likelihood(self, x: Tensor, recon: Tensor) -> Tensor:
        return _gaussian_loglik(x, recon, self.obs_sigma)


DIFFUSERS_DEFAULTS: dict[str, Any] = {"path": "", "image_size": None, "obs_sigma": 1.0}


def build_diffusers(params: dict[str, Any], input_shape: tuple[int, ...]) -> nn.Module:
    """Load ``AutoencoderKL.from_pretrained(path)`` (local files, safetensors only)."""
    p = {**DIFFUSERS_DEFAULTS, **params}
    diffusers = _require("diffusers")
    vae = diffusers.AutoencoderKL.from_pretrained(str(Path(p["path"]).expanduser()), local_files_only=True,
                                                  low_cpu_mem_usage=False,
                                                  use_safetensors=True)
    size = p["image_size"] or int(vae.config.sample_size)
    return DiffusersAutoencoderKL(vae.float().eval(), size, float(p["obs_sigma"]))


def _check_autoencoder_folder(path: str) -> None:
    """Before any work: ``path`` holds an AutoencoderKL as ``save_pretrained`` writes it (config.json naming
    AutoencoderKL, safetensors weights), else a ValueError says what the folder is and what to give instead
    (diffusers' own errors name neither)."""
    folder = Path(path).expanduser()
    what = f"model 'diffusers_autoencoder_kl': path={path!r}"
    if (folder / "model_index.json").is_file():
        hint = f"path={str(folder / 'vae')!r}" if (folder / "vae" / "config.json").is_file() else "its vae/ folder"
        raise ValueError(f"{what} is a diffusion pipeline's folder; give its autoencoder: {hint}")
    config = folder / "config.json"
    if not config.is_file():
        raise ValueError(f"{what} holds no config.json; give the folder an AutoencoderKL was saved to "
                         "(save_pretrained), e.g. the vae/ folder of a latent diffusion model")
    try:
        cls = json.loads(config.read_text()).get("_class_name")
    except (ValueError, OSError, AttributeError) as err:
        raise ValueError(f"{what}: config.json cannot be read as a JSON object ({err})") from None
    if cls not in (None, "AutoencoderKL"):
        raise ValueError(f"{what} holds a {cls}, not an AutoencoderKL; give the folder of the model's autoencoder")
    if not any(folder.glob("*.safetensors")):
        raise ValueError(f"{what} holds no .safetensors weights; robbench loads only safetensors (no pickles): "
                         "re-save the model with save_pretrained(folder, safe_serialization=True)")


def _validate_diffusers(params: dict[str, Any]) -> None:
    p = {**DIFFUSERS_DEFAULTS, **params}
    _check_dir("diffusers_autoencoder_kl", p["path"])
    _check_installed("diffusers_autoencoder_kl", "diffusers")
    _check_autoencoder_folder(p["path"])
    _check_size("diffusers_autoencoder_kl", p["image_size"])
    _check_sigma("diffusers_autoencoder_kl", p["obs_sigma"])


# ---------------------------------------------------------------------------------------------
# pythae
# ---------------------------------------------------------------------------------------------
PICKLED_NETWORKS = ("encoder.pkl", "decoder.pkl")


class PythaeVAE(nn.Module):
    """A pythae model (VAE, BetaVAE, ...) seen through the VAEModel protocol.

    mu = encoder(x).embedding; sigma = exp(log_covariance / 2) (0 for models without one, e.g. AE);
    decode(z) = decoder(z)["reconstruction"]. log p(x|z) follows the model's ``reconstruction_loss``:
    "mse" -> unit-variance Gaussian (pythae's 0.5 * squared error), "bce" -> Bernoulli.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.pythae = model
        cfg = model.model_config
        self.input_shape = tuple(int(v) for v in cfg.input_dim)
        self.latent_dim = int(cfg.latent_dim)
        self.reconstruction_loss = getattr(cfg, "reconstruction_loss", "mse")

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out = self.pythae.encoder(x)
        mu = out.embedding.flatten(1)
        logvar = out.get("log_covariance") if hasattr(out, "get") else None
        sigma = torch.zeros_like(mu) if logvar is None else torch.exp(0.5 * logvar.flatten(1))
        return mu, sigma

    def decode(self, z: Tensor) -> Tensor:
        return self.pythae.decoder(z)["reconstruction"].reshape(-1, *self.input_shape)

    def log_likelihood(self, x: Tensor, recon: Tensor) -> Tensor:
        if self.reconstruction_loss == "bce":
            p = recon.flatten(1).clamp(1e-6, 1 - 1e-6)
            t = x.flatten(1)
            return (t * p.log() + (1 - t) * (1 - p).log()).sum(1)
        return _gaussian_loglik(x, recon, 1.0)


PYTHAE_DEFAULTS: dict[str, Any] = {"path": "", "trust_pickled_code": False}


def _check_pythae_folder(folder: Path, trust_pickled_code: bool) -> None:
    """ValueError saying what to give unless ``folder`` is a folder pythae's ``model.save()`` wrote whose
    pickled networks (if any) the user trusts."""
    if not (folder / "model_config.json").is_file():
        # what a user gives instead: pythae's training folder (final_model inside), a diffusers folder
        # TrainingPipeline(output_dir=D) writes D/VAE_training_<date>/final_model: D or the dated folder;
        # the newest final_model first (the dates sort), else any checkpoint
        inner = sorted((f.parent for pattern in ("*/model_config.json", "*/*/model_config.json")
                        for f in folder.glob(pattern)), key=lambda d: (d.name == "final_model", str(d)), reverse=True)
        hint = (f"; it is a training folder: give path='{inner[0]}'" if inner else
                "; it holds a config.json, as a diffusers model does (family diffusers_autoencoder_kl?)"
                if (folder / "config.json").is_file() else "")
        raise ValueError(f"model 'pythae': {folder} holds no model_config.json{hint}; give the folder written "
                         "by pythae's model.save() (e.g. .../final_model)")
    pickles = [name for name in PICKLED_NETWORKS if (folder / name).exists()]
    if pickles and not trust_pickled_code:
        raise ValueError(f"model 'pythae': {folder} holds custom networks as pickles ({', '.join(pickles)}); "
                         f"unpickling runs arbitrary code, so robbench loads them only with "
                         f"trust_pickled_code: true (set it only for folders you trust)")


def build_pythae(params: dict[str, Any], input_shape: tuple[int, ...]) -> nn.Module:
    """``AutoModel.load_from_folder(path)``; folders with pickled networks need ``trust_pickled_code``."""
    p = {**PYTHAE_DEFAULTS, **params}
    folder = Path(p["path"]).expanduser()
    _check_pythae_folder(folder, p["trust_pickled_code"])
    _require("pythae")
    from pythae.models import AutoModel

    # Without pickles the only file read is model.pt, which pythae reads with torch.load; torch >= 2.6
    # defaults to weights_only=True, so a tampered model.pt cannot run code either.
    model = AutoModel.load_from_folder(str(folder))
    return PythaeVAE(model.float().eval())


def _validate_pythae(params: dict[str, Any]) -> None:
    p = {**PYTHAE_DEFAULTS, **params}
    _check_dir("pythae", p["path"])
    _check_installed("pythae", "pythae")
    if not isinstance(p["trust_pickled_code"], bool):
        raise ValueError(f"model 'pythae': trust_pickled_code={p['trust_pickled_code']!r} must be true or false")
    _check_pythae_folder(Path(p["path"]).expanduser(), p["trust_pickled_code"])  # up front, as diffusers'


# ---------------------------------------------------------------------------------------------
# any torch module
# ---------------------------------------------------------------------------------------------
TORCH_MODULE_DEFAULTS: dict[str, Any] = {"factory": "", "weights": None, "kwargs": {}, "input_range": [0.0, 1.0]}
PROTOCOL = ("encode", "decode", "latent_dim", "input_shape")


def import_callable(spec: str) -> Callable[..., Any]:
    """``package.module:callable`` or ``path/to/file.py:callable``; the working directory is importable."""
    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise ValueError(f"model 'torch_module': factory={spec!r} must look like module:callable")
    if mod_name.endswith(".py"):
        file = Path(mod_name).expanduser()
        if not file.is_file():
            raise ValueError(f"model 'torch_module': factory file {file} does not exist{_from_cwd(file)}")
        spec_ = importlib.util.spec_from_file_location(file.stem, file)
        if spec_ is None or spec_.loader is None:
            raise ValueError(f"model 'torch_module': cannot import {mod_name}")
        module = importlib.util.module_from_spec(spec_)
        spec_.loader.exec_module(module)
    else:
        if "" not in sys.path and str(Path.cwd()) not in sys.path:
            sys.path.insert(0, str(Path.cwd()))  # like `python -m`: modules next to the user's config
        try:
            module = importlib.import_module(mod_name)
        except ModuleNotFoundError as err:
            raise ValueError(f"model 'torch_module': cannot import {mod_name} ({err}); install it, run from its "
                             "folder, or give factory=path/to/file.py:callable") from err
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ValueError(f"model 'torch_module': {mod_name} has no attribute {attr!r}") from None


def load_weights(path: str) -> dict[str, Tensor]:
    """A state dict from ``.safetensors`` (safetensors) or any other file via torch.load(weights_only=True)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"model 'torch_module': weights file {file} does not exist{_from_cwd(file)}")
    if file.suffix == ".safetensors":
        safetensors_torch = _require("safetensors.torch")
        try:
            return safetensors_torch.load_file(str(file))
        except Exception as err:  # safetensors raises its own SafetensorError (not an OSError) on a bad header
            raise ValueError(f"model 'torch_module': weights {file} is not a readable .safetensors file "
                             f"({type(err).__name__}: {err})") from err
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"model 'torch_module': weights {file} cannot be read by torch.load(weights_only=True) "
                         f"({first[:200]}); save the state dict, torch.save(model.state_dict(), path), or a "
                         ".safetensors file (robbench never unpickles code)") from err
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"model 'torch_module': {file} holds a {type(state).__name__}, not a state dict")
    return state


def build_torch_module(params: dict[str, Any], input_shape: tuple[int, ...]) -> nn.Module:
    """``factory(**kwargs)`` with ``weights`` loaded (strict); declares ``input_range`` unless it has one."""
    p = {**TORCH_MODULE_DEFAULTS, **params}
    kwargs = dict(p["kwargs"] or {})
    factory = import_callable(p["factory"])
    try:
        module = factory(**kwargs)
    except TypeError as err:  # most often a keyword the factory does not take
        raise ValueError(f"model 'torch_module': calling {p['factory']}(**{kwargs!r}) raised TypeError: {err}; "
                         "check torch_module.kwargs") from err
    if not isinstance(module, nn.Module):
        raise ValueError(f"model 'torch_module': {p['factory']} returned a {type(module).__name__}, not an nn.Module")
    missing = [name for name in PROTOCOL if not hasattr(module, name)]
    if missing:
        raise ValueError(f"model 'torch_module': {p['factory']} returned a module without {', '.join(missing)} "
                         f"(a model needs encode(x) -> (mu, sigma), decode(z), latent_dim, input_shape)")
    if p["weights"]:
        try:
            module.load_state_dict(load_weights(p["weights"]))
        except RuntimeError as err:  # missing/unexpected keys or size mismatches, listed by torch
            detail = " ".join(str(err).split())
            raise ValueError(f"model 'torch_module': weights {p['weights']} do not fit the module "
                             f"{p['factory']}(**{kwargs!r}) builds: {detail[:600]}; check torch_module.kwargs "
                             "(e.g. sizes) and that the factory builds the architecture the weights were saved "
                             "from") from err
    if getattr(module, "input_range", None) is None:
        module.input_range = tuple(float(v) for v in p["input_range"])
    return module.float().eval()


def _validate_torch_module(params: dict[str, Any]) -> None:
    p = {**TORCH_MODULE_DEFAULTS, **params}
    if not isinstance(p["factory"], str) or ":" not in p["factory"]:
        raise ValueError(f"model 'torch_module': factory={p['factory']!r} must look like module:callable")
    source = p["factory"].partition(":")[0]
    if source.endswith(".py") and not Path(source).expanduser().is_file():
        raise ValueError(f"model 'torch_module': factory file {Path(source).expanduser()} does not exist"
                         f"{_from_cwd(source)}")
    if p["weights"] is not None and not (isinstance(p["weights"], str) and p["weights"]):
        raise ValueError(f"model 'torch_module': weights={p['weights']!r} must be null or a file path")
    if p["weights"] is not None:
        if not Path(p["weights"]).expanduser().is_file():
            raise ValueError(f"model 'torch_module': weights={p['weights']!r} is not a file{_from_cwd(p['weights'])}")
        if p["weights"].endswith(".safetensors"):
            _check_installed("torch_module", "safetensors")
    if not isinstance(p["kwargs"], dict):
        raise ValueError(f"model 'torch_module': kwargs={p['kwargs']!r} must be a mapping")
    box = p["input_range"]
    if not (isinstance(box, (list, tuple)) and len(box) == 2 and all(isinstance(v, (int, float)) for v in box)
            and box[0] < box[1]):
        raise ValueError(f"model 'torch_module': input_range={box!r} must be [lo, hi] with lo < hi")


# ---------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------
def families() -> list[ModelFamily]:
    return [
        ModelFamily("diffusers_autoencoder_kl",
                    "diffusers AutoencoderKL from a local directory (inputs in [-1, 1]); needs robbench[models]",
                    build_diffusers, dict(DIFFUSERS_DEFAULTS), trainable=False, validate=_validate_diffusers),
        ModelFamily("pythae", "a pythae model folder written by model.save(); pickled custom networks only "
                    "with trust_pickled_code; needs robbench[models]",
                    build_pythae, dict(PYTHAE_DEFAULTS), trainable=False, validate=_validate_pythae),
        ModelFamily("torch_module", "any module:callable returning an nn.Module with encode/decode, weights from "
                    ".safetensors or a weights_only checkpoint",
                    build_torch_module, dict(TORCH_MODULE_DEFAULTS), trainable=False,
                    validate=_validate_torch_module),
    ]


@hookimpl
def register_models(register: Callable) -> None:
    for family in families():
        register(family)
