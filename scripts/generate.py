#!/usr/bin/env python
"""Generate text with kvjax: ``python scripts/generate.py --model DIR --prompt TEXT``.

See ``python scripts/generate.py --help``; the same program is installed as
``kvjax-generate``.
"""

import sys

from kvjax.cli import main

if __name__ == "__main__":
    sys.exit(main())
