"""`make run`: the whole control plane on this one machine.

Starts a local etcd (data under var/etcd), the controller and one agent (state under
var/agent) offering every backend this machine has; Ctrl-C stops the VMs, the agent,
the controller and etcd, in that order, and leaves nothing running.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VAR = ROOT / "var"


def wait_http(url: str, timeout: float, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with status {proc.returncode}; see its log in {VAR}")
        try:
            with urllib.request.urlopen(url, timeout=0.5):  # noqa: S310 - loopback only
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{what} did not answer {url} within {timeout:.0f}s")


def start(argv: list[str], log_name: str, env: dict[str, str] | None = None
          ) -> subprocess.Popen[bytes]:
    log = open(VAR / log_name, "ab")  # noqa: SIM115 - lives as long as the process
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)


def stop(proc: subprocess.Popen[bytes], timeout: float) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--etcd-port", type=int, default=23790)
    parser.add_argument("--listen", default="127.0.0.1:50051")
    parser.add_argument("--http-listen", default="127.0.0.1:8080")
    args = parser.parse_args()
    etcd = shutil.which("etcd")
    if etcd is None:
        raise SystemExit("etcd is not installed (Debian package etcd-server); run `make deps`")
    VAR.mkdir(exist_ok=True)
    py = sys.executable
    client_url = f"http://127.0.0.1:{args.etcd_port}"
    procs: list[tuple[str, subprocess.Popen[bytes]]] = []
    try:
        etcd_proc = start([
            etcd, "--name", "local", "--data-dir", str(VAR / "etcd"),
            "--listen-client-urls", client_url, "--advertise-client-urls", client_url,
            "--listen-peer-urls", f"http://127.0.0.1:{args.etcd_port + 1}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{args.etcd_port + 1}",
            "--initial-cluster", f"local=http://127.0.0.1:{args.etcd_port + 1}",
            "--heartbeat-interval", "10", "--election-timeout", "100",
            "--auto-compaction-mode", "revision", "--auto-compaction-retention", "1000",
        ], "etcd.log")
        procs.append(("etcd", etcd_proc))
        wait_http(f"{client_url}/health", 20, etcd_proc, "etcd")
        controller = start([py, "-m", "controller.main", "--listen", args.listen,
                            "--http-listen", args.http_listen,
                            "--etcd-endpoints", f"127.0.0.1:{args.etcd_port}",
                            "--backend-preference", "qemu,firecracker,cloud-hypervisor"],
                           "controller.log")
        procs.append(("controller", controller))
        wait_http(f"http://{args.http_listen}/_/health", 20, controller, "controller")
        env = dict(os.environ)
        agent = start([py, "-m", "agent.main", "--controller", args.listen,
                       "--state-dir", str(VAR / "agent"), "--stop-vms-on-exit", "true"],
                      "agent.log", env)
        procs.append(("agent", agent))
        print(f"control plane running: gRPC {args.listen}, health http://{args.http_listen}/_/health")
        print(f"logs in {VAR}/{{etcd,controller,agent}}.log; Ctrl-C stops everything")
        print("try:  .venv/bin/vmmctl hosts")
        print("      .venv/bin/vmmctl create -f deploy/examples/linux-guest.json")
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        while all(p.poll() is None for _, p in procs):
            time.sleep(0.5)
        for name, p in procs:
            if p.poll() is not None:
                print(f"{name} exited with status {p.returncode}; see {VAR}/{name}.log")
    except KeyboardInterrupt:
        print("\nstopping")
    finally:
        # The agent first: it stops its VMs; etcd last.
        for name, p in reversed(procs):
            stop(p, 60 if name == "agent" else 10)


if __name__ == "__main__":
    main()
