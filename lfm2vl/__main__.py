"""`python -m lfm2vl` = the `lfm2vl` command."""
import sys

from lfm2vl.cli import main

sys.exit(main())
