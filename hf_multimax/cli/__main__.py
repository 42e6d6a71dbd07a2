"""``python -m hf_multimax.cli``: the same as the ``hf-multimax`` command."""

import sys

from . import main

sys.exit(main())
