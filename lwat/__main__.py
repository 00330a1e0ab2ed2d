"""`python -m lwat` is the `lwat` command (also what torchrun runs: `torchrun ... -m lwat train ...`)."""

import sys

from lwat.cli import main

sys.exit(main())
