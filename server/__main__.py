"""`python -m server [options]` = `coolfusion serve [options]`."""

import sys

from .cli import serve_main

sys.exit(serve_main())
