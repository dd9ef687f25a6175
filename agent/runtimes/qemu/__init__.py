"""The QEMU backend: the runtime (runtime.QemuRuntime) and the modules it is built from."""
