"""The robbench plugin of this package: an attack (``shift``) and a model family (``my_vae``)."""
import torch

from robbench import hookimpl
from robbench.inputrange import input_range
from robbench.protocols import AttackResult, ModelFamily


class ShiftAttack:
    """Adds the same value to every pixel: delta of norm L (a weak, easy-to-check attack)."""
    name = "shift"
    description = "uniform shift of norm L"
    defaults = {"sign": 1.0}                      # every parameter with its default

    def __call__(self, model, x, radius, *, params, generator, init=None):
        lo, hi = input_range(model)               # the model's declared input box, [0, 1] by default
        unit = torch.ones_like(x) / x[0].numel() ** 0.5
        delta = params["sign"] * radius.view(-1, *[1] * (x.dim() - 1)) * unit
        delta = (x + delta).clamp(lo, hi) - x      # stay in the box (and inside the ball)
        with torch.no_grad():
            clean = model.decode(model.encode(x)[0])
            damage = (model.decode(model.encode(x + delta)[0]) - clean).flatten(1).norm(dim=1)
        return AttackResult(delta=delta, damage=damage)


@hookimpl
def register_attacks(register):
    register(ShiftAttack())


@hookimpl
def register_models(register):
    from my_plugin.models import MyVAE             # an nn.Module with encode/decode/log_likelihood/loss
    register(ModelFamily(name="my_vae", description="my VAE",
                         build=lambda params, shape: MyVAE(shape, **params),
                         defaults={"latent_dim": 16, "gamma": [1.0, 2.0]}, sweep=("gamma",)))
