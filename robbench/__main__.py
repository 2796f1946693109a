"""``python -m robbench``: the same command line as the ``robbench`` console script."""
import sys

from robbench.launch import main

sys.exit(main())
