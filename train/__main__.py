"""``python -m train``: see :mod:`train.recipe`."""

import sys

from train.recipe import main

sys.exit(main())
