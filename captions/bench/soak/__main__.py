"""A soak child process: `python -m captions.bench.soak ROLE CONFIG` (runs.py starts them)."""

import sys

from captions.bench.soak.bots import _child_main

raise SystemExit(_child_main(sys.argv[1], sys.argv[2]))
