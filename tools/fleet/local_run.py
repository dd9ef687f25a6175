"""`make run`: the whole control plane on this one machine.

Starts a local etcd (data under var/etcd), the controller and one agent (state under
var/agent) offering every backend this machine has, and prepares /var/lib/vmm/ for the
example configs in deploy/examples/. It also makes the fleet network "local": a bridge with
this host's address on it (no NAT), so a guest on it gets an address and answers ping from
the host. Ctrl-C stops the VMs, the agent, the controller and etcd, in that order, removes
the bridge and leaves nothing running.
"""

from __future__ import annotations

import argparse
import ipaddress
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
from pyroute2 import IPRoute

from agent.network import links
from tools.fleet.etcd_server import EtcdServer, EtcdServerError
from tools.guests import images as guest_images
from vmm.v1 import network_pb2, network_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
VAR = ROOT / "var"
# Where deploy/examples/ point: guests (a link to the built images) and disk images.
EXAMPLE_ROOT = Path("/var/lib/vmm")
EXAMPLE_DISK_BYTES = 64 << 20


def prepare_example_files(guests: Path) -> None:
    """Make the files the example configs name exist (sparse disks, the built guest)."""
    link = EXAMPLE_ROOT / "guests"
    EXAMPLE_ROOT.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or not link.exists():
        link.unlink(missing_ok=True)
        link.symlink_to(guests.resolve(), target_is_directory=True)
    images = EXAMPLE_ROOT / "images"
    images.mkdir(exist_ok=True)
    for example in (ROOT / "deploy" / "examples").glob("*.json"):
        for word in example.read_text().split('"'):
            path = Path(word)
            if word.startswith(str(images)) and not path.exists():
                with open(path, "wb") as f:
                    f.truncate(EXAMPLE_DISK_BYTES)


def stable_guest_names(cache: Path) -> Path:
    """var/guests/current/{vmlinux,bzImage,initramfs.cpio.gz,tiny.elf,tiny-pvh.elf}."""
    linux = guest_images.linux_guest(cache)
    tiny = guest_images.tiny_guest(cache)
    current = cache / "current"
    current.mkdir(parents=True, exist_ok=True)
    for name, target in (("vmlinux", linux.vmlinux), ("bzImage", linux.bzimage),
                         ("initramfs.cpio.gz", linux.initramfs), ("tiny.elf", tiny.elf64),
                         ("tiny-pvh.elf", tiny.pvh32)):
        link = current / name
        link.unlink(missing_ok=True)
        link.symlink_to(target.resolve())
    return current


LOCAL_NETWORK = "local"
LOCAL_BRIDGE = "br-vmm-local"


def make_local_bridge(subnet: ipaddress.IPv4Network) -> bool:
    """The bridge of the local network, with the host's address (the subnet's first) on it;
    True when this run made it (and so removes it)."""
    made = links.ensure_bridge(LOCAL_BRIDGE)
    gateway = str(next(subnet.hosts()))
    with IPRoute() as ip:
        index = ip.link_lookup(ifname=LOCAL_BRIDGE)[0]
        if not any(a.get("IFA_ADDRESS") == gateway for a in ip.get_addr(index=index)):
            ip.addr("add", index=index, address=gateway, prefixlen=subnet.prefixlen)
    return made


def define_local_network(address: str, subnet: ipaddress.IPv4Network) -> None:
    network = network_pb2.Network(name=LOCAL_NETWORK, bridge=LOCAL_BRIDGE, cidr=str(subnet),
                                  gateway=str(next(subnet.hosts())))
    with grpc.insecure_channel(address) as channel:
        try:
            network_pb2_grpc.NetworkServiceStub(channel).CreateNetwork(
                network_pb2.CreateNetworkRequest(network=network), timeout=10)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.ALREADY_EXISTS:  # kept in var/etcd from a last run
                raise


def unjailed_if_simulators_unreachable() -> list[str]:
    """The simulators run on this Python: where other users cannot reach it (a Python
    installed under root's home), hypervisors run as the agent's user instead."""
    path = Path(sys.executable).resolve()
    if all(p.stat().st_mode & 0o001 for p in path.parents) and path.stat().st_mode & 0o001:
        return []
    print(f"note: {path} is not reachable by other users, so hypervisors run as root here")
    return ["--hypervisor-uids", ""]


def wait_http(url: str, timeout: float, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with status {proc.returncode}; see var/{what}.log")
        try:
            with urllib.request.urlopen(url, timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{what} did not answer {url} within {timeout:.0f}s")


def start(argv: list[str], log_name: str) -> subprocess.Popen[bytes]:
    with open(VAR / log_name, "ab") as log:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                start_new_session=True)


def stop(proc: subprocess.Popen[bytes], timeout: float) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    parser = argparse.ArgumentParser(description="Run the control plane on this machine.")
    parser.add_argument("--etcd-port", type=int, default=23790)
    parser.add_argument("--listen", default="127.0.0.1:50051")
    parser.add_argument("--http-listen", default="127.0.0.1:8080")
    parser.add_argument("--network-cidr", default="10.213.0.0/24",
                        help="subnet of the local network; the host takes its first address")
    args = parser.parse_args()
    subnet = ipaddress.IPv4Network(args.network_cidr)
    VAR.mkdir(exist_ok=True)
    guests = stable_guest_names(guest_images.default_cache_dir())
    prepare_example_files(guests)

    etcd = EtcdServer(VAR / "etcd", name="local", ports=(args.etcd_port, args.etcd_port + 1))
    procs: list[tuple[str, subprocess.Popen[bytes]]] = []
    py = sys.executable
    made_bridge = False
    try:
        made_bridge = make_local_bridge(subnet)
        try:
            etcd.start()
        except EtcdServerError as exc:
            raise SystemExit(f"etcd did not start: {exc}\n{etcd.log_tail()}") from None
        controller = start([py, "-m", "controller.main", "--listen", args.listen,
                            "--http-listen", args.http_listen, "--etcd-endpoints", etcd.endpoint],
                           "controller.log")
        procs.append(("controller", controller))
        wait_http(f"http://{args.http_listen}/_/health", 30, controller, "controller")
        define_local_network(args.listen, subnet)
        agent = start([py, "-m", "agent.main", "--controller", args.listen,
                       "--state-dir", str(VAR / "agent"), "--stop-vms-on-exit", "true",
                       # The examples' files: /var/lib/vmm, whose guests link points into
                       # the built images (the path policy follows links to their target).
                       "--host-path-roots",
                       f"{EXAMPLE_ROOT},{guest_images.default_cache_dir().resolve()}",
                       *unjailed_if_simulators_unreachable()],
                      "agent.log")
        procs.append(("agent", agent))
        print(f"control plane running: gRPC {args.listen}, "
              f"health http://{args.http_listen}/_/health, etcd {etcd.endpoint}")
        print(f"logs: {VAR}/controller.log, {VAR}/agent.log, {etcd.log_path}")
        print(f"network {LOCAL_NETWORK}: {subnet} on bridge {LOCAL_BRIDGE}, this host "
              f"{next(subnet.hosts())}")
        print("in another shell:  . .venv/bin/activate; vmmctl hosts; "
              "vmmctl create -f deploy/examples/linux-guest.json")
        print("Ctrl-C stops everything")
        # Stop on Ctrl-C and on SIGTERM alike, even where a shell started us with SIGINT
        # ignored (as it does for background jobs).
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _interrupt)
        while all(p.poll() is None for _, p in procs):
            time.sleep(0.5)
        for name, p in procs:
            if p.poll() is not None:
                print(f"{name} exited with status {p.returncode}; see {VAR}/{name}.log")
    except KeyboardInterrupt:
        print("\nstopping")
    finally:
        # The agent first (it stops its VMs), then the controller, etcd last.
        for name, p in reversed(procs):
            stop(p, 60 if name == "agent" else 10)
        etcd.stop()
        if made_bridge:
            links.remove_link(LOCAL_BRIDGE)


if __name__ == "__main__":
    main()
