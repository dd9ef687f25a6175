"""Code generation: the protobuf modules from proto/ and docs/backends.md from the runtimes."""
