"""`python -m sharedcache ...`: the `sharedcache` command, for a Python whose scripts directory is not on PATH."""
import sys

from .cli import main

sys.exit(main())
