"""The compiled engine of the ``max_damage`` attack: one op call per ascent on MLP VAEs.

``torch.ops.robbench.mlp_attack_step`` (csrc/cpu/attack_cpu.cpp) computes, for the given rows, the
encoder forward of x + delta, the decoder forward over the eta draws (drawn inside the op from the same
counter-based streams as :mod:`robbench.rng`, bit for bit), the objective, its gradient with respect to
delta (hand-written backward, no autograd graph), the normalised step and the exact ball-and-box
projection. ``torch.ops.robbench.mlp_stall_ascent`` runs :func:`robbench.projection.stall_ascent`'s whole
loop over those steps (same decisions, same order; :meth:`FusedObjective.stall_ascent`), which is what the
attack calls; from 8 rows it splits them into 2 groups (at any thread count, so results do not depend on
it), each running the whole loop on its own thread when torch has several (csrc/cpu/attack_cpu.cpp,
``ROBBENCH_ATTACK_SPLIT``). What it computes
equals the ``torch`` engine's autograd path up to float rounding (tests/test_fused_attack.py).

Supported: the built-in :class:`~robbench_plugins.models.VAE` family members whose encoder and decoder
are MLPs (``nn.Sequential`` of ``nn.Linear`` and the activations of :data:`ACT_CODES`, with those
activations' default settings) on the CPU in float32: VAE / beta-VAE / sigma-offset VAE / beta-TCVAE
(sigma = softplus(.) + eps + tau), the fixed-sigma VAE and the autoencoder (sigma independent of x).
:func:`fused_spec` returns None for anything else (the attack then uses autograd).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from robbench.projection import project_ball_box

ENGINES = ("auto", "torch", "compiled")

# Activation codes of csrc/cpu/attack_cpu.cpp (AttackAct); only default-parameter modules qualify.
ACT_NONE = 0
ACT_CODES: dict[type[nn.Module], int] = {nn.ReLU: 1, nn.Sigmoid: 2, nn.ELU: 3, nn.LeakyReLU: 4, nn.Tanh: 5,
                                          nn.Softplus: 6, nn.GELU: 7}
ROUTE_CODES = {"both": 0, "mu": 1, "sigma": 2}

# Rows through the encoder and the decoder by the op since import (benchmarks/margin_convergence.py reads
# them: the compiled engine does not call model.encode / model.decode).
ROWS = {"encode": 0, "decode": 0}


def _default_act(mod: nn.Module) -> int | None:
    """The op's code for an activation module with torch's default settings, else None."""
    code = ACT_CODES.get(type(mod))
    if code is None:
        return None
    if isinstance(mod, nn.ELU) and mod.alpha != 1.0:
        return None
    if isinstance(mod, nn.LeakyReLU) and mod.negative_slope != 0.01:
        return None
    if isinstance(mod, nn.Softplus) and (mod.beta != 1.0 or mod.threshold != 20.0):
        return None
    if isinstance(mod, nn.GELU) and mod.approximate != "none":
        return None
    return code


def mlp_layers(seq: nn.Module, *, flatten_first: bool) -> tuple[list[Tensor], list[Tensor], list[int]] | None:
    """(weights (out, in), biases (out,), activation codes) of an ``nn.Sequential`` of Linear layers each
    followed by at most one supported activation (an optional leading Flatten when ``flatten_first``),
    as detached float32 CPU tensors; None for any other module."""
    if not isinstance(seq, nn.Sequential):
        return None
    mods = list(seq)
    if flatten_first and mods and isinstance(mods[0], nn.Flatten):
        mods = mods[1:]
    ws: list[Tensor] = []
    bs: list[Tensor] = []
    acts: list[int] = []
    for mod in mods:
        if isinstance(mod, nn.Linear):
            w = mod.weight.detach()
            if w.device.type != "cpu" or w.dtype != torch.float32:
                return None
            ws.append(w.contiguous())
            bs.append(mod.bias.detach().contiguous() if mod.bias is not None else torch.zeros(w.shape[0]))
            acts.append(ACT_NONE)
        else:
            code = _default_act(mod)
            if code is None or not acts or acts[-1] != ACT_NONE:
                return None
            acts[-1] = code
    return (ws, bs, acts) if ws else None


@dataclass
class FusedSpec:
    """An MLP VAE in the op's form. sigma_kind 0: encoder outputs [mu | pre], sigma = softplus(pre) +
    sigma_offset; 1: encoder outputs mu, sigma does not depend on x."""

    enc: tuple[list[Tensor], list[Tensor], list[int]]
    dec: tuple[list[Tensor], list[Tensor], list[int]]
    sigma_kind: int
    sigma_offset: float


def fused_spec(model: Any) -> FusedSpec | None:
    """The op's description of ``model``, or None when the op does not support it (see module doc).
    A model in the harness's output-checking wrapper (:class:`robbench.checks.CheckedModel`, which every
    run uses) is described by the model inside: the op reads only its weights, and the attack's final
    damage still goes through the wrapper's checked ``encode`` / ``decode``."""
    from robbench.checks import CheckedModel
    from robbench_plugins.models import SIGMA_EPS, VAE, Autoencoder, FixedSigmaVAE

    if isinstance(model, CheckedModel):
        model = model.unwrapped
    if not isinstance(model, VAE) or type(model).decode is not VAE.decode:
        return None
    encode = type(model).encode
    if encode is VAE.encode:
        kind, offset = 0, SIGMA_EPS + float(model.tau)
    elif encode is FixedSigmaVAE.encode or encode is Autoencoder.encode:
        kind, offset = 1, 0.0
    else:
        return None
    enc = mlp_layers(model.encoder, flatten_first=True)
    dec = mlp_layers(model.decoder, flatten_first=False)
    if enc is None or dec is None:
        return None
    k = model.latent_dim
    if enc[0][-1].shape[0] != (2 * k if kind == 0 else k) or dec[0][0].shape[1] != k:
        return None
    return FusedSpec(enc, dec, kind, offset)


def available() -> bool:
    """True when the compiled extension loads and has the attack op."""
    from robbench import kernels

    return kernels.load() and hasattr(torch.ops.robbench, "mlp_attack_step")


def resolve_engine(engine: str, model: Any, x: Tensor) -> FusedSpec | None:
    """The spec to run the compiled engine with, or None for the torch engine. ``auto``: compiled when
    the model is supported (:func:`fused_spec`), x is a float32 CPU tensor and the extension loads;
    ``compiled`` raises ValueError saying why it cannot run; ``torch``: always None."""
    if engine not in ENGINES:
        raise ValueError(f"attack parameter engine={engine!r}; expected one of {', '.join(ENGINES)}")
    if engine == "torch":
        return None
    spec = fused_spec(model) if x.device.type == "cpu" and x.dtype == torch.float32 else None
    if spec is None or not available():
        if engine == "compiled":
            why = ("the compiled extension is unavailable" if spec is not None else
                   "the model is not a supported MLP VAE on the CPU in float32 (see robbench_plugins.fused_attack)")
            raise ValueError(f"attack parameter engine='compiled': {why}; use engine='auto' or 'torch'")
        return None
    return spec


class FusedObjective:
    """The attack's objective on one set of points, through the op.

    x: (B, D) flattened inputs; center: (B, F) = g(mu(x)); mu_c, sig_c: (B, k) clean encoder outputs;
    radius: (B,); box: the input range. ``rows`` arguments index these B points."""

    def __init__(self, spec: FusedSpec, x: Tensor, center: Tensor, mu_c: Tensor, sig_c: Tensor, radius: Tensor,
                 route: str, box: tuple[float, float]):
        if not available():
            raise RuntimeError("the compiled extension with robbench::mlp_attack_step is unavailable")
        self.spec, self.route = spec, ROUTE_CODES[route]
        self.x = x.flatten(1).contiguous()
        self.center, self.mu_c, self.sig_c = center.contiguous(), mu_c.contiguous(), sig_c.contiguous()
        self.radius = radius.float().contiguous()
        self.box = (float(box[0]), float(box[1]))
        self._empty = torch.empty(0)
        self._no_keys = torch.empty(0, dtype=torch.int64)

    def _call(self, rows: Tensor, delta: Tensor, *, eta: Tensor | None = None,
              keys: tuple[Tensor, Tensor] | None = None, j0: int = 0, n_half: int = 0,
              step_len: Tensor | None = None, mode: int = 0) -> tuple[Tensor, Tensor]:
        s = self.spec
        ka, kb = keys if keys is not None else (self._no_keys, self._no_keys)
        n = rows.shape[0]
        ROWS["encode"] += n
        ROWS["decode"] += n * (2 * n_half if n_half else (eta.shape[0] if eta is not None else 1))
        return torch.ops.robbench.mlp_attack_step(
            self.x, delta.flatten(1), rows, self.center, self.mu_c, self.sig_c,
            self._empty if eta is None else eta, ka, kb, j0, n_half, *s.enc, *s.dec, self.route, s.sigma_kind,
            s.sigma_offset, self._empty if step_len is None else step_len.float(),
            self.radius, self.box[0], self.box[1], mode)

    def stall_ascent(self, starts: list[Tensor], *, steps: int, step_size: float | Tensor, check_every: int = 4,
                     stall_tol: float = 1e-3, min_step: float = 0.02, per_start: bool = False,
                     keys: tuple[Tensor, Tensor] | None = None, n_half: int = 0,
                     eval_eta: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """:func:`robbench.projection.stall_ascent` on these points with the op's steps (antithetic draws
        ``step * n_half ..`` of the streams ``keys``; n_half 0: eta = 0) and scores (``eval_eta`` (S, B, k);
        None: eta = 0), the whole loop in one op call: the same contract, arguments and decisions.
        starts: R tensors (B, *shape). Returns (delta (B, *shape), (B,)), or every start's (per_start)."""
        B, R = self.x.shape[0], len(starts)
        shape = starts[0].shape[1:]
        xr = self.x.repeat(R, 1)
        rows = torch.arange(B).repeat(R)
        delta = project_ball_box(torch.cat(starts, 0).flatten(1), xr, self.radius.repeat(R), box=self.box)
        alpha = torch.as_tensor(step_size, dtype=torch.float32).expand(B).repeat(R).contiguous()
        ka, kb = keys if keys is not None else (self._no_keys, self._no_keys)
        s = self.spec
        best, best_val, counts = torch.ops.robbench.mlp_stall_ascent(
            self.x, delta, rows, self.center, self.mu_c, self.sig_c, self._empty if eval_eta is None else eval_eta,
            ka, kb, n_half, *s.enc, *s.dec, self.route, s.sigma_kind, s.sigma_offset, self.radius, alpha, int(steps),
            int(check_every), float(stall_tol), float(min_step), self.box[0], self.box[1])
        ROWS["encode"] += int(counts[0])  # counts: (encoder rows, decoder rows, row groups used)
        ROWS["decode"] += int(counts[1])
        best = best.view(R * B, *shape)
        if per_start:
            return best, best_val
        vals = best_val.view(R, B)
        pick = vals.argmax(0)
        return best[pick * B + torch.arange(B)], vals.max(0).values

    def value(self, rows: Tensor, delta: Tensor, eta: Tensor | None = None) -> Tensor:
        """Objective per row (N,): mean over eta (S, B, k) of the distance, or the eta = 0 distance."""
        return self._call(rows, delta, eta=eta)[0]

    def gradient(self, rows: Tensor, delta: Tensor, eta: Tensor | None = None) -> Tensor:
        """d value / d delta: (N, D) (for tests against autograd)."""
        return self._call(rows, delta, eta=eta, mode=1)[1]

    def step(self, rows: Tensor, delta: Tensor, step_len: Tensor, *, keys: tuple[Tensor, Tensor] | None = None,
             j0: int = 0, n_half: int = 0, eta: Tensor | None = None) -> Tensor:
        """One normalised, projected ascent step of length step_len (N,) (input units): (N, *shape).
        With ``keys`` (ka, kb: (B,)) the objective uses antithetic draws j0 .. j0 + n_half - 1 of the
        points' streams; else ``eta`` (S, B, k) or eta = 0."""
        new = self._call(rows, delta, eta=eta, keys=keys, j0=j0, n_half=n_half, step_len=step_len, mode=2)[1]
        return new.view_as(delta)
