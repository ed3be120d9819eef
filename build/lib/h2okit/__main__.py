"""`python -m h2okit` is the `h2okit` command."""

import sys

from .cli import main

sys.exit(main())
