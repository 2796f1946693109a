"""Source of a throwaway third-party robbench plugin, installed by tests as its own distribution.

Written to a temporary directory as module ``robbench_tp_demo`` next to a ``.dist-info`` folder whose
``entry_points.txt`` declares it in the ``robbench`` group: exactly what ``pip install`` of a third
party's package would leave behind.
"""
import math
import os
import signal
import time

import torch

from robbench import hookimpl, rng
from robbench_plugins.analytic import LinearGaussianVAE
from robbench.backends import CountResult
from robbench.protocols import AttackResult, DatasetSpec, MetricColumn, ModelFamily, SplitData


def _blobs(options):
    gen = torch.Generator().manual_seed(7)
    grid = torch.linspace(-1, 1, 8)
    yy, xx = torch.meshgrid(grid, grid, indexing="ij")
    centres = torch.rand(120, 2, generator=gen) * 1.2 - 0.6
    images = torch.exp(-((xx - centres[:, :1, None]) ** 2 + (yy - centres[:, 1:, None]) ** 2) / 0.2)
    images = (0.15 + 0.7 * images).unsqueeze(1).float()
    labels = torch.zeros(120, dtype=torch.int64)
    return SplitData(images[:80], labels[:80], images[80:], labels[80:])


class ConstantAttack:
    """Moves every pixel by the same amount: a weak attack whose damage is easy to predict."""

    name = "tp_constant"
    description = "third-party demo attack: a uniform shift of norm L"
    defaults = {"sign": 1.0}

    def __call__(self, model, x, radius, *, params, generator, init=None):
        pixels = x[0].numel()
        delta = params["sign"] * radius.view(-1, *[1] * (x.dim() - 1)) / math.sqrt(pixels) * torch.ones_like(x)
        with torch.no_grad():
            damage = (model.decode(model.encode(x + delta)[0]) - model.decode(model.encode(x)[0])).flatten(1).norm(dim=1)
        return AttackResult(delta=delta, damage=damage)


class DamageAtRadius:
    """Reports the attack's damage at one radius, and declares its own leaderboard column."""

    name = "tp_damage"
    description = "third-party demo estimator: attack damage at a fixed radius"
    defaults = {"radius": 0.1}
    needs_attack = True
    columns = (MetricColumn("tp_damage_mean", "mean tp damage", "damage", "mean", "lower", ".4f"),)

    def __call__(self, ctx, x):
        radius = torch.full((len(x),), float(ctx.params["radius"]))
        result = ctx.attack(ctx.model, x, radius, params=ctx.attack_params,
                            generator=torch.Generator().manual_seed(ctx.seed))
        return [{"damage": float(d)} for d in result.damage]


class NaiveBackend:
    """A Monte Carlo backend with no chunking: every sample of every point through model.decode at once.
    It draws the same samples as robbench's backends (robbench.rng), so its counts agree with theirs."""

    name = "tp_naive"
    description = "third-party demo backend: all samples decoded at once"
    precisions = ("fp32",)
    auto_priority = None  # only when asked for by name

    def unavailable(self, device, *, warn=False):
        return None

    def sq_distances(self, model, mu, sigma, center, n_samples, *, seed, stream_ids, sample_offset=0,
                     chunk_rows=2048):
        B, k = mu.shape
        ka, kb = rng.stream_keys(seed, stream_ids)
        j = torch.arange(sample_offset, sample_offset + n_samples, device=mu.device).repeat(B)
        eta = rng.normals(ka.repeat_interleave(n_samples), kb.repeat_interleave(n_samples), j, k)
        z = (eta.view(B, n_samples, k) * sigma[:, None] + mu[:, None]).view(-1, k)
        y = model.decode(z).flatten(1).view(B, n_samples, -1)
        return ((y - center[:, None]) ** 2).sum(2)

    def count_within(self, model, mu, sigma, center, r2, n_samples, *, seed, stream_ids, sample_offset=0,
                     chunk_rows=2048, precision=None, screen=True):
        d2 = self.sq_distances(model, mu, sigma, center, n_samples, seed=seed, stream_ids=stream_ids,
                               sample_offset=sample_offset)
        return CountResult((d2 <= r2[:, None]).sum(1), 0, 0, d2.numel(), "fp32")


@hookimpl
def register_backends(register):
    register(NaiveBackend())


class PixelMean:
    """Mean pixel of each point, after an optional sleep. Fault injection for executor tests: when the
    file named by $ROBBENCH_TP_KILL exists, a call SIGKILLs its own process (a worker dying mid-task) --
    once (the call that removes the file) or, if the file says "always", every time."""

    name = "tp_pixel_mean"
    description = "third-party demo estimator: mean pixel (sleeps `seconds` per batch; fault injection via $ROBBENCH_TP_KILL)"
    defaults = {"seconds": 0.0}
    needs_attack = False

    def __call__(self, ctx, x):
        _maybe_die(os.environ.get("ROBBENCH_TP_KILL"))
        time.sleep(float(ctx.params["seconds"]))
        return [{"pixel_mean": float(xi.mean())} for xi in x]


def _maybe_die(marker):
    if not marker or not os.path.exists(marker):
        return
    try:
        with open(marker) as f:
            always = f.read().strip() == "always"
        if not always:
            os.remove(marker)  # only one process wins the removal, so only one dies
    except OSError:
        return
    os.kill(os.getpid(), signal.SIGKILL)


@hookimpl
def register_models(register):
    register(ModelFamily(name="tp_linear", description="third-party demo: a ready linear-Gaussian VAE",
                         build=lambda params, shape: LinearGaussianVAE(shape, params["latent_dim"]),
                         defaults={"latent_dim": 4}, trainable=False))


@hookimpl
def register_datasets(register):
    register(DatasetSpec(name="tp_blobs", description="third-party demo: 120 synthetic 8x8 blobs", load=_blobs))


@hookimpl
def register_attacks(register):
    register(ConstantAttack())


@hookimpl
def register_estimators(register):
    register(DamageAtRadius())
    register(PixelMean())
