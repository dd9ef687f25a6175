"""vmmctl, the command-line client of the vmm-control-plane API, and how it renders replies."""
