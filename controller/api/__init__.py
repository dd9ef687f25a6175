"""The public gRPC API: VmService, one class per concern composed in service.py; HostService."""
