"""``python -m molf_jax.cli``: the same as the ``molf-jax`` command."""

import sys

from molf_jax.cli import main

sys.exit(main())
