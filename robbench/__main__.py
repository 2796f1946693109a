"""``python -m robbench``: the same command line as the ``robbench`` console script."""
import sys

from robbench.cli import main

sys.exit(main())
