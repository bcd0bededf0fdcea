"""``python -m relay_sidecar.endpoint``: the same as ``relay-sidecar-endpoint``."""

import sys

from .cli import main

sys.exit(main())
