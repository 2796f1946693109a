"""Source of a throwaway third-party robbench plugin, installed by tests as its own distribution.

Written to a temporary directory as module ``robbench_tp_demo`` next to a ``.dist-info`` folder whose
``entry_points.txt`` declares it in the ``robbench`` group: exactly what ``pip install`` of a third
party's package would leave behind.
"""
import math

import torch

from robbench import hookimpl
from robbench.analytic import LinearGaussianVAE
from robbench.protocols import AttackResult, DatasetSpec, ModelFamily, SplitData


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
    """Reports the attack's damage at one radius."""

    name = "tp_damage"
    description = "third-party demo estimator: attack damage at a fixed radius"
    defaults = {"radius": 0.1}
    needs_attack = True

    def __call__(self, ctx, x):
        radius = torch.full((len(x),), float(ctx.params["radius"]))
        result = ctx.attack(ctx.model, x, radius, params=ctx.attack_params,
                            generator=torch.Generator().manual_seed(ctx.seed))
        return [{"damage": float(d)} for d in result.damage]


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
