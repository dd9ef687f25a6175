"""A control plane on one machine: the `make run` launcher, an etcd server and the test cluster."""
