"""`python -m tools.simulators.firecracker`: the same as the `firecracker-sim` script."""

import sys

from tools.simulators.firecracker.main import main

sys.exit(main())
