"""`python -m samhq_fast ...`: the samhq-fast command line."""

import sys

from .cli import main

sys.exit(main())
