"""``python -m modjax.train --config experiments/NAME.py[:ARG] --workdir DIR``."""

import sys

from modjax.train.main import main

if __name__ == "__main__":
    sys.exit(main())
