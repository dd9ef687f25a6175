"""`python -m tools.simulators.cloud_hypervisor`: the same as the `cloud-hypervisor-sim` script."""

import sys

from tools.simulators.cloud_hypervisor.main import main

sys.exit(main())
