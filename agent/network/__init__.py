"""The host side of VM networking: TAP devices on bridges, named after their VM.

`names` derives every name and MAC from the VM and NIC ids, `links` is the netlink layer
(pyroute2), and `host` is what the reconciler calls: make a VM's TAPs before its hypervisor
opens them, remove them after, and sweep the TAPs of this agent that no VM owns.
"""
