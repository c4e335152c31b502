"""``python -m zfkernels ...`` is ``zfk ...`` (and what ``torchrun -m zfkernels`` runs)."""

import sys

from .cli import main

sys.exit(main())
