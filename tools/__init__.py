"""The project's tools, one package each.

vmmctl is the CLI that ships to users; simulators stand in for hypervisor binaries; guests
builds guest images; fleet runs a control plane on one machine; bench holds the benchmarks;
codegen generates the protobuf modules and docs/backends.md.
"""
