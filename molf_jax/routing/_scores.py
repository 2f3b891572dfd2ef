"""Routing scores: how good is each expert's next step? (paper Eqs. 10 and 11).

A score is split in two so that it vectorises over every module at once:

* ``elementwise(mu, nu, grad, param)`` maps one leaf's arrays (float32) to an array, or a tuple
  of arrays, of the leaf's shape. These are summed over all elements of an expert (per layer
  slice for stacked leaves). XLA fuses the map with the sum, so no extra memory is used.
* ``combine(sums, info)`` turns those per-expert sums, each a float32 ``[modules, experts]``
  array, into the score; ``info`` is an `ExpertInfo` with parameter counts, each expert's
  learning rate at this step, and the step count.

Sums cover norms, means and inner products. Higher scores win.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["ExpertInfo", "Score", "epd", "pfn", "resolve_score", "score_name", "SCORE_EPS"]

# The constant inside both paper scores, independent of Adam's own eps.
SCORE_EPS = 1e-8


class ExpertInfo(NamedTuple):
    """Per-expert context handed to `Score.combine`.

    Attributes:
      num_params: float32 [M, E], parameter count of each expert (per layer slice); 1 where the
        module has no such expert.
      learning_rate: float32 [M, E], the expert's learning rate at this step (schedule applied).
      count: int32 scalar, number of routed steps taken before this one.
    """

    num_params: jax.Array
    learning_rate: jax.Array
    count: jax.Array


class Score(NamedTuple):
    """A routing score (see the module docstring for the contract).

    Attributes:
      elementwise: ``(mu, nu, grad, param) -> array | tuple of arrays``; mu and nu are the inner
        Adam optimizer's raw (not bias-corrected) moments after this step's update, or None when
        ``uses_moments`` is False.
      combine: ``(sums, info: ExpertInfo) -> [M, E] scores``; ``sums`` mirrors what
        ``elementwise`` returns.
      uses_moments: whether the score reads Adam moments (then the inner optimizer must have
        them).

    Example, a gradient-norm score per parameter::

        Score(elementwise=lambda mu, nu, g, p: g * g,
              combine=lambda s, info: jnp.sqrt(s / info.num_params),
              uses_moments=False)
    """

    elementwise: Callable[..., Any]
    combine: Callable[[Any, ExpertInfo], jax.Array]
    uses_moments: bool = True


def _epd_elementwise(mu, nu, grad, param):
    del grad, param
    return mu * mu / (jnp.sqrt(nu) + SCORE_EPS)


def _epd_combine(sums, info):
    return info.learning_rate * sums / info.num_params


def _pfn_elementwise(mu, nu, grad, param):
    del grad, param
    return jnp.square(mu / (jnp.sqrt(nu) + SCORE_EPS))


def _pfn_combine(sums, info):
    return jnp.sqrt(sums) / jnp.sqrt(info.num_params)


# Expected preconditioned descent, paper Eq. 10: S = lr_e(t) * sum(m^2 / (sqrt(v) + eps)) / N_e.
epd = Score(_epd_elementwise, _epd_combine)
# Preconditioned Frobenius norm, paper Eq. 11: S = ||m / (sqrt(v) + eps)||_F / sqrt(N_e).
pfn = Score(_pfn_elementwise, _pfn_combine)

_NAMED = {"epd": epd, "pfn": pfn}


def score_name(score: str | Score) -> str:
    """How errors name a score: its name or import path as given, else its ``combine``'s.

    Example:
      >>> score_name(epd), score_name("molf_jax.routing:pfn")
      ('epd', 'molf_jax.routing:pfn')
    """
    if isinstance(score, str):
        return score
    for name, known in _NAMED.items():
        if score is known:
            return name
    combine = score.combine
    return f"{getattr(combine, '__module__', '?')}:{getattr(combine, '__qualname__', combine)}"


def resolve_score(score: str | Score) -> Score:
    """Returns the `Score` for a name, an import path, or a `Score` (passed through).

    Names: ``"epd"``, ``"pfn"``. An import path ``"package.module:name"`` names a module-level
    `Score` of your own (the module must be importable, e.g. on ``PYTHONPATH``).

    Example:
      >>> resolve_score("molf_jax.routing:pfn") is resolve_score("pfn")
      True
    """
    if isinstance(score, Score):
        return score
    if isinstance(score, str) and score.lower() in _NAMED:
        return _NAMED[score.lower()]
    if isinstance(score, str) and ":" in score:
        module_name, _, attribute = score.partition(":")
        try:
            found = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as error:
            raise ValueError(f"routing score {score!r} not found: {error}") from error
        if not isinstance(found, Score):
            raise ValueError(f"routing score {score!r} is a {type(found).__name__}, not a "
                             "molf_jax.routing.Score")
        return found
    raise ValueError(f"unknown routing score {score!r}; use one of {sorted(_NAMED)}, "
                     "'package.module:name', or a molf_jax.routing.Score")
