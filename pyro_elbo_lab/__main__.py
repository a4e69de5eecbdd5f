# SPDX-License-Identifier: Apache-2.0
"""``python -m pyro_elbo_lab demo``: the same as the ``pyro-elbo-lab`` command."""

import sys

from .cli import main

sys.exit(main())
