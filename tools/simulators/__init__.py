"""API-faithful hypervisor simulators, started exactly like the real binary, where it is absent."""
