"""A routing score of your own: EPD without its learning-rate factor.

EPD (paper Eq. 10) multiplies each expert's ``sum(m^2 / (sqrt(v) + eps)) / N_e`` by the
expert's learning rate, so the FFT/LoRA rate ratio steers the routing as much as the gradients
do. This variant keeps the preconditioned descent and drops the rate, so the ratio no longer
decides which expert wins:

  molf-jax train --score molf_jax.experiments.scores:epd_without_lr

The reproduction's routing study runs it beside EPD and PFN. Your own score lives in any
importable module and is named the same way, ``package.module:name``.
"""

from molf_jax.routing import SCORE_EPS, Score


def _descent(mu, nu, grad, param):
    del grad, param
    return mu * mu / (SCORE_EPS + nu ** 0.5)


def _per_parameter(sums, info):
    return sums / info.num_params


epd_without_lr = Score(elementwise=_descent, combine=_per_parameter)
