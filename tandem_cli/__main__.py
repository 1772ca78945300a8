"""`python -m tandem_cli`: the same as the `tandem` console script."""

import sys

from tandem_cli.main import main

sys.exit(main())
