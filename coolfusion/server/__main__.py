"""`python -m coolfusion.server [options]` = `coolfusion serve [options]`."""

import sys

from coolfusion.server.cli import serve_main

sys.exit(serve_main())
