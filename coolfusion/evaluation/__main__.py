"""`python -m coolfusion.evaluation --task gsm8k --models a,b --base-url http://127.0.0.1:8000/v1`."""

import sys

from coolfusion.evaluation.cli import main

sys.exit(main())
