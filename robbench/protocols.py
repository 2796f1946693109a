"""The small protocols every plugin object meets.

A plugin registers one of these objects through a hook in :mod:`robbench.hookspecs`. The harness only
ever talks to plugins through them, so this module (with ``hookspecs.py``) is the whole contract.

Conventions used throughout robbench:
- images are float tensors of shape ``(B, *input_shape)``, e.g. ``(B, 1, 28, 28)``, in the model's
  declared ``input_range`` ([0, 1] unless the model says otherwise; :mod:`robbench.inputrange`);
- latents are ``(B, k)``; ``sigma`` is the encoder standard deviation (not the variance);
- norms are Euclidean norms of the flattened tensors, in input-space or output-space units.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from robbench.settings import RunSettings
from robbench.paramspec import Param  # noqa: F401  (plugins declare ``constraints`` with it)


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------
@runtime_checkable
class VAEModel(Protocol):
    """A trained (or trainable) VAE; in practice an ``nn.Module``.

    Attributes: ``input_shape`` (tuple, without batch), ``latent_dim`` (int), and optionally
    ``input_range`` (lo, hi): the box its inputs live in (default [0, 1]; a diffusers autoencoder
    declares (-1, 1)). Attacks keep x + delta inside it; data are mapped onto it.
    """

    input_shape: tuple[int, ...]
    latent_dim: int

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: (B, *input_shape) in the input range; returns (mu, sigma), each (B, latent_dim), sigma >= 0."""

    def decode(self, z: Tensor) -> Tensor:
        """z: (N, latent_dim); returns the decoder mean g(z), (N, *input_shape)."""

    def log_likelihood(self, x: Tensor, recon: Tensor) -> Tensor:
        """log p(x | z) for the decoder mean ``recon`` = g(z); x, recon: (B, *input_shape); returns (B,)."""

    def loss(self, x: Tensor) -> tuple[Tensor, dict[str, float]]:
        """Training objective to minimise on a batch (scalar) and floats to log, including ``elbo``
        (the per-example ELBO in nats, beta = 1). Only trainable models need it."""


@dataclass
class ModelFamily:
    """A registered model family, e.g. ``beta_vae``.

    ``defaults`` lists every parameter the family accepts with its default value; names in ``sweep``
    may hold a list, and the harness expands the Cartesian product of those lists into one model
    configuration (one leaderboard row) each. ``build(params, input_shape)`` returns an untrained
    ``nn.Module`` meeting :class:`VAEModel`; ``trainable=False`` marks ready-built models (analytic
    or loaded from a file) that the harness uses as they are.
    ``validate(params)``, when given, raises ``ValueError`` naming the key and value that is wrong.
    """

    name: str
    description: str
    build: Callable[[dict[str, Any], tuple[int, ...]], nn.Module]
    defaults: dict[str, Any] = field(default_factory=dict)
    sweep: tuple[str, ...] = ()
    trainable: bool = True
    validate: Callable[[dict[str, Any]], None] | None = None


# ---------------------------------------------------------------------------------------------
# Data sets
# ---------------------------------------------------------------------------------------------
@dataclass
class SplitData:
    """Images as float32 tensors (N, *input_shape) in ``input_range`` ([0, 1] unless the data set
    declares otherwise), labels as int64 (N,)."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    input_range: tuple[float, float] = (0.0, 1.0)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])


@dataclass
class DataOptions:
    """What a data-set loader may use: a local directory for file-based sets, and the split seed."""

    data_dir: Path | None = None
    seed: int = 0
    test_fraction: float = 0.2


@dataclass
class DatasetSpec:
    """A registered data set: ``load(options)`` returns a :class:`SplitData` (never downloads)."""

    name: str
    description: str
    load: Callable[[DataOptions], SplitData]
    architecture: str = "mlp"  # default encoder/decoder family for models trained on it ("mlp"|"conv")


# ---------------------------------------------------------------------------------------------
# Attacks
# ---------------------------------------------------------------------------------------------
@dataclass
class AttackResult:
    """delta: (B, *input_shape) with ||delta_b||_2 <= rho_b and x + delta in the model's input range
    (``robbench.inputrange.input_range(model)``, [0, 1] by default);
    damage: (B,) the achieved objective, ||g(.) - g(mu(x))||_2 in output units."""

    delta: Tensor
    damage: Tensor


class Attack(Protocol):
    """A registered attack. ``defaults`` lists its parameters (documented by the plugin); an optional
    ``constraints`` maps parameter names to :class:`~robbench.paramspec.Param` (type, bounds, choices),
    checked with every given value before any work starts."""

    name: str
    description: str
    defaults: dict[str, Any]

    def __call__(
        self,
        model: VAEModel,
        x: Tensor,
        rho: Tensor,
        *,
        params: dict[str, Any],
        generator: torch.Generator,
        init: Tensor | None = None,
        point_ids: Tensor | None = None,
    ) -> AttackResult:
        """x: (B, *input_shape) in the model's input range; rho: (B,) input-space L2 budgets (passed positionally); ``init`` an optional warm start
        delta (B, *input_shape); ``point_ids`` (B,) the points' test-set indices. Must be deterministic
        given ``generator``; an attack that draws its random numbers per point from ``point_ids``
        (``robbench.rng``) gives every point the same result however the points are batched. Accepting
        ``point_ids`` is optional: :func:`call_attack` passes it only to attacks that take it."""


def call_attack(attack: Attack, model: VAEModel, x: Tensor, rho: Tensor, *, params: dict[str, Any],
                generator: torch.Generator, init: Tensor | None = None,
                point_ids: Tensor | None = None, init_radius: Tensor | None = None) -> AttackResult:
    """Call ``attack``, passing ``point_ids`` and ``init_radius`` (B,) (the radius at which ``init`` was
    found, before it was rescaled to ``rho``: lets an attack size its work to the radius change) when its
    ``__call__`` accepts that keyword, and check its
    result (shape, finite, ||delta|| <= rho, x + delta in [0, 1]; see :mod:`robbench.checks`): an
    invalid result raises :class:`robbench.checks.PluginOutputError`."""
    kwargs: dict[str, Any] = {"params": params, "generator": generator}
    if init is not None:
        kwargs["init"] = init
    if point_ids is not None and _accepts(attack, "point_ids"):
        kwargs["point_ids"] = point_ids
    if init is not None and init_radius is not None and _accepts(attack, "init_radius"):
        kwargs["init_radius"] = init_radius
    result = attack(model, x, rho, **kwargs)
    from robbench.checks import check_attack_result  # the harness trusts no attack's output
    from robbench.inputrange import input_range

    check_attack_result(getattr(attack, "name", type(attack).__name__), result, x, rho, point_ids,
                        bounds=None if getattr(model, "input_bounds", ()) is None else input_range(model))
    return result


def _accepts(fn: Any, name: str) -> bool:
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


# ---------------------------------------------------------------------------------------------
# Estimators
# ---------------------------------------------------------------------------------------------
@dataclass
class EstimationContext:
    """Everything an estimator may use for one (model, attack) pair on a batch of points.

    ``run`` holds the run-wide settings (:class:`robbench.settings.RunSettings`: ``ctx.run.r``,
    ``.m``, ``.confidence``, ``.backend``, ``.seed``, ``.device``); ``params`` only the estimator's own
    parameters (its ``defaults`` merged with what the user gave). ``attack`` is None for estimators with
    ``needs_attack = False``; ``attack_params`` are the attack's merged parameters. ``point_ids`` are
    the test-set indices of the points (B,), used to seed per-point random streams so results do not
    depend on batching.
    """

    model: VAEModel
    attack: Attack | None
    attack_params: dict[str, Any]
    params: dict[str, Any]
    point_ids: Tensor
    run: RunSettings = field(default_factory=RunSettings)

    @property
    def seed(self) -> int:
        """The run seed (``run.seed``)."""
        return self.run.seed

    @property
    def device(self) -> torch.device:
        return torch.device(self.run.device)


# An estimator may put {name: Tensor} under this key of a point's dict (e.g. the adversarial input and its
# reconstruction): the runner keeps them as files for the first points and the API as ``ResultTable.arrays``,
# instead of storing them with the numbers.
ARRAYS_KEY = "_arrays"


AGGREGATIONS = ("mean", "ci", "median", "count_true", "count_missing", "tally", "pearson", "slope", "ratio",
                "count_above")
PAIRED_AGGREGATIONS = ("pearson", "slope", "ratio", "count_above")
DIRECTIONS = ("higher", "lower", None)


@dataclass(frozen=True)
class MetricColumn:
    """How one of an estimator's per-point metrics summarises into a leaderboard column.

    key: the record key the column writes (``margin_mean``; for ``ci`` the prefix of ``<key>_lo`` and
    ``<key>_hi``); header: the column heading, where ``{level}`` becomes the run's confidence in percent;
    metric: the per-point key it reads; aggregation, over the points of one (model, attack) row:
      ``mean``: mean of the finite values; ``ci``: Student-t interval of that mean at the run's
      confidence; ``count_true``: points whose value is true; ``count_missing``: points whose value is
      None or not finite (e.g. a vacuous bound); ``tally``: how many points hold each distinct text
      value, most frequent first ("latent 14, max_damage 11"; format "s"), left out where every value is
      the row's attack label (one attack set them all by construction); ``pearson`` / ``slope``: correlation / least-squares
      slope of (metric, ``paired``'s metric) over the points that have both (needs 3); ``ratio``: mean over
      those points of metric / paired metric (where the paired value is > 0); ``count_above``: how many of
      them have metric > paired metric;
    direction: "higher" or "lower" is better (None: neither); format: a format spec (".3f", "d");
    paired: ``(estimator, metric)`` of the y values for the paired aggregations;
    rank: the column's default leaderboard ranking (at most one column should set it: rows sort by it,
    best first by ``direction``); order: position hint, lower first (ties keep registration order).
    Several estimators may declare the same ``key``: the column then holds the values of the first of them
    by name that reports it; where every row of that one failed, the next one's, marked ``<key>_from``.

    Points nested in trained networks: ``ci`` is the t interval over per-seed means when the row has
    several seeds (the network is the unit; the record says which under ``<key>_unit``), over points
    otherwise. ``median``: the median of the values.
    censored: the per-point boolean key of a right-censored metric (e.g. a margin still robust at the
    cap): such a point has no value, only the lower limit in ``censored_value``. It enters ``mean``,
    ``ci`` and ``median`` at that limit, so the mean is a restricted mean — a lower bound of the mean,
    recorded as ``<key>_lower_bound`` and shown "≥ x" — the interval's upper end is +inf, and the median
    is kept only while fewer than half the points are censored.
    infinite: (key, value): a point whose ``key`` equals ``value`` has the value +inf (e.g. a bound with
    a zero Jacobian): ``mean`` becomes +inf and ``count_missing`` does not count it.
    """

    key: str
    header: str
    metric: str
    aggregation: str = "mean"
    direction: str | None = None
    format: str = ".3f"
    paired: tuple[str, str] | None = None
    rank: bool = False
    order: float = 100.0
    censored: str | None = None
    censored_value: str | None = None
    infinite: tuple[str, str] | None = None

    def __post_init__(self) -> None:
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"column {self.key!r}: unknown aggregation {self.aggregation!r}; "
                             f"allowed: {', '.join(AGGREGATIONS)}")
        if self.direction not in DIRECTIONS:
            raise ValueError(f"column {self.key!r}: direction must be 'higher', 'lower' or None, "
                             f"got {self.direction!r}")
        if (self.aggregation in PAIRED_AGGREGATIONS) != (self.paired is not None):
            raise ValueError(f"column {self.key!r}: 'paired' is needed by, and only by, "
                             f"{', '.join(PAIRED_AGGREGATIONS)}")

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "header": self.header, "metric": self.metric, "aggregation": self.aggregation,
                "direction": self.direction, "format": self.format,
                "paired": list(self.paired) if self.paired else None, "rank": self.rank, "order": self.order,
                "censored": self.censored, "censored_value": self.censored_value,
                "infinite": list(self.infinite) if self.infinite else None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MetricColumn":
        data = dict(data)
        for key in ("paired", "infinite"):
            if data.get(key) is not None:
                data[key] = tuple(data[key])
        return cls(**data)


class Estimator(Protocol):
    """A registered estimator: returns one flat dict of numbers/strings per point.

    Keys are metric names (e.g. ``margin``, ``margin_lo``, ``margin_hi``, ``bound``, ``min_sigma``);
    values are float, int, str or None. ``columns`` (optional) declares how metrics appear in
    leaderboards (:class:`MetricColumn`); the leaderboard knows no metric by name. Optional
    ``constraints``: as for :class:`Attack`.
    """

    name: str
    description: str
    defaults: dict[str, Any]
    needs_attack: bool
    columns: tuple[MetricColumn, ...]

    def __call__(self, ctx: EstimationContext, x: Tensor) -> list[dict[str, Any]]:
        """x: (B, *input_shape) in the model's input range; returns B dicts."""
