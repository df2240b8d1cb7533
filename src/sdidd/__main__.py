"""`python -m sdidd` = the `sdidd` command."""
import sys

from .cli import main

sys.exit(main())
