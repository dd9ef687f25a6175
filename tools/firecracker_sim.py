"""firecracker-sim: a stand-in for the Firecracker v1.14.2 binary that serves its API for real.

Started exactly like Firecracker (`firecracker-sim --api-sock PATH [--id ID]
[--level L] [--log-path P] [--metrics-path P] [--config-file F] [--no-seccomp]
[--seccomp-filter F] [--boot-timer] ...`), it serves Firecracker's HTTP/1.1 API
on the Unix socket with the same paths, bodies, status codes, `fault_message`
texts, headers and pre-/post-boot state machine, matched against recorded
exchanges with the real binary. It runs no guest code; what it simulates:

Console (stdout, which an agent sends to the VM's console log). Firecracker's
own log lines go there until PUT /logger sets a log path. At InstanceStart the
simulated guest writes two lines on its serial console:

    [    0.000000] Command line: <kernel command line, with Firecracker's root= part>
    GUEST-READY

`GUEST-READY` is the readiness marker. PUT /serial redirects these lines to a file.

Kernel image. InstanceStart refuses an image that does not start with the ELF
magic, with Firecracker's loader error. SendCtrlAltDel goes to the guest through
the emulated i8042 keyboard: if the kernel image contains the bytes `i8042`
(a Linux kernel with the i8042 driver, as Debian's and Firecracker's guest
kernels are), the guest reboots about 0.1 s after the 204 answer, and, as
Firecracker exits when its guest reboots, the process prints
`reboot: Restarting system` on the console, logs "Vmm is stopping." and exits
with status 0. Any other image ignores the keystroke and keeps running. A
paused guest handles the keystroke when resumed.

Metrics. With PUT /metrics (or --metrics-path), one JSON line per write in
Firecracker's layout (`block_<drive_id>` per drive, `net_<iface_id>` per
interface, deltas since the previous line): at InstanceStart or snapshot load,
on FlushMetrics, and every 60 s (FIRECRACKER_SIM_METRICS_PERIOD_S overrides the
period). Counters that the simulation produces are real (API requests, console
bytes, pause/resume/snapshot latencies, drive updates); device I/O stays 0.

Snapshots. PUT /snapshot/create (paused VMs only) writes a state file with
Firecracker's header and the simulator's own state, and a sparse memory file of
the guest memory size. A fresh process loads it with PUT /snapshot/load; a
failed load answers, then exits with status 1, as Firecracker does.

Process. SIGTERM and SIGINT kill the process by the signal, as they kill
Firecracker (which installs no handler for them); SIGHUP exits with status 156.
Like Firecracker, it never removes the API socket file, and refuses to start
(status 1) when that path already exists.

`python -m tools.firecracker_sim` works as well as the console script.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from tools.firecracker_sim_api import ApiHandler
from tools.firecracker_sim_errno import io_error
from tools.firecracker_sim_http import ApiServer, EventLoop, bind_unix
from tools.firecracker_sim_logger import Logger
from tools.firecracker_sim_metrics import Metrics, MetricsAlreadyInitialized
from tools.firecracker_sim_resources import ActionError
from tools.firecracker_sim_schemas import LEVELS, MMDS_DATA, VMM_CONFIG
from tools.firecracker_sim_serde import JsonError, from_slice, rust_debug_str
from tools.firecracker_sim_snapshot import FORMAT_VERSION, SnapshotFormatError, describe
from tools.firecracker_sim_vmm import METRICS_PERIOD_S, Vmm

DEFAULT_API_SOCK = "/run/firecracker.socket"
DEFAULT_ID = "anonymous-instance"
DEFAULT_PAYLOAD_LIMIT = 51200
VERSION = "1.14.2"
EXIT_GENERIC, EXIT_BAD_CONFIGURATION, EXIT_ARG_PARSING, EXIT_SIGHUP = 1, 152, 153, 156
SEE_HELP = " \\n\\nFor more information try --help."

# name: (takes a value, help, default)
ARGUMENTS: dict[str, tuple[bool, str, str | None]] = {
    "api-sock": (True, "Path to unix domain socket used by the API.", DEFAULT_API_SOCK),
    "boot-timer": (False, "Whether or not to load boot timer device for logging elapsed time "
                          "since InstanceStart command.", None),
    "config-file": (True, "Path to a file that contains the microVM configuration in JSON "
                          "format.", None),
    "describe-snapshot": (True, "Print the data format version of the provided snapshot state "
                                "file.", None),
    "enable-pci": (False, "Enables PCIe support.", None),
    "http-api-max-payload-size": (True, "Http API request payload max size, in bytes.",
                                  str(DEFAULT_PAYLOAD_LIMIT)),
    "id": (True, "MicroVM unique identifier.", DEFAULT_ID),
    "level": (True, "Set the logger level.", None),
    "log-path": (True, "Path to a fifo or a file used for configuring the logger on startup.",
                 None),
    "metadata": (True, "Path to a file that contains metadata in JSON format to add to the "
                       "mmds.", None),
    "metrics-path": (True, "Path to a fifo or a file used for configuring the metrics on "
                           "startup.", None),
    "mmds-size-limit": (True, "Mmds data store limit, in bytes.", None),
    "module": (True, "Set the logger module filter.", None),
    "no-api": (False, "Optional parameter which allows starting and using a microVM without "
                      "an active API socket.", None),
    "no-seccomp": (False, "Optional parameter which allows starting and using a microVM "
                          "without seccomp filtering. Not recommended.", None),
    "parent-cpu-time-us": (True, "Parent process CPU time (wall clock, microseconds). This "
                                 "parameter is optional.", None),
    "seccomp-filter": (True, "Optional parameter which allows specifying the path to a custom "
                             "seccomp filter. For advanced users.", None),
    "show-level": (False, "Whether or not to output the level in the logs.", None),
    "show-log-origin": (False, "Whether or not to include the file path and line number of "
                               "the log's origin.", None),
    "snapshot-version": (False, "Print the supported data format version.", None),
    "start-time-cpu-us": (True, "Process start CPU time (wall clock, microseconds). This "
                                "parameter is optional.", None),
    "start-time-us": (True, "Process start time (wall clock, microseconds). This parameter is "
                            "optional.", None),
    "version": (False, "Print the binary version number.", None),
}
FORBIDS = {"seccomp-filter": "no-seccomp", "no-seccomp": "seccomp-filter"}
REQUIRES = {"no-api": "config-file"}
# --config-file errors name the resource, not the API call.
CONFIG_FILE_PREFIXES = {
    "Balloon config error: ": "Balloon device error: ",
    "Drive config error: ": "Block device error: ",
    "Network config error: ": "Network device error: ",
    "Machine config error: ": "VM config error: ",
    "Vsock config error: ": "Vsock device error: ",
    "MMMDS config error: ": "MMDS config error: ",
}


class ArgError(Exception):
    """UtilsArgParserError: its Display text, and its `{:?}` for stderr."""

    def __init__(self, message: str, debug: str) -> None:
        super().__init__(message)
        self.debug = debug


def _unexpected(name: str) -> ArgError:
    return ArgError(f"Found argument '{name}' which wasn't expected, or isn't valid in this "
                    f'context.', f'UnexpectedArgument("{name}")')


class Args:
    def __init__(self, values: dict[str, str] | None = None,
                 flags: set[str] | None = None) -> None:
        self.values = values or {}
        self.flags = flags or set()

    def get(self, name: str) -> str | None:
        return self.values.get(name, ARGUMENTS[name][2])


def parse_args(argv: list[str]) -> Args:
    """Firecracker's own argument parser rules (not argparse's)."""
    if "--" in argv:
        argv = argv[:argv.index("--")]
    if "--help" in argv or "-h" in argv:
        return Args(flags={"help"})
    if "--version" in argv:
        return Args(flags={"version"})
    args = Args()
    items = iter(argv)
    for arg in items:
        if not arg.startswith("--"):
            raise _unexpected(arg)
        name = arg[2:]
        if name not in ARGUMENTS:
            raise _unexpected(name)
        if name in args.values or name in args.flags:
            raise ArgError(f"The argument '{name}' was provided more than once.",
                           f'DuplicateArgument("{name}")')
        if ARGUMENTS[name][0]:
            value = next(items, None)
            if value is None or value.startswith("--"):
                raise ArgError(f"The argument '{name}' requires a value, but none was supplied.",
                               f'MissingValue("{name}")')
            args.values[name] = value
        else:
            args.flags.add(name)
    given = set(args.values) | args.flags
    for name in sorted(given):
        if name in REQUIRES and REQUIRES[name] not in given:
            raise ArgError(f"Argument '{REQUIRES[name]}' required, but not found.",
                           f'MissingArgument("{REQUIRES[name]}")')
        if name in FORBIDS and FORBIDS[name] in given:
            raise ArgError(f"Argument '{FORBIDS[name]}' cannot be used together with argument "
                           f"'{name}'.", f'ForbiddenArgument("{name}", "{FORBIDS[name]}")')
    return args


def help_text() -> str:
    # --help is listed too: Firecracker adds it while parsing.
    arguments = {**ARGUMENTS, "help": (False, "Show the help message.", None)}
    lefts = {n: f"--{n} <{n}>" if spec[0] else f"--{n}" for n, spec in arguments.items()}
    width = max(len(v) for v in lefts.values()) + 3
    lines = ["optional arguments:"]
    for name, (_, text, default) in sorted(arguments.items()):
        suffix = f' [default: "{default}"]' if default is not None else ""
        lines.append(f"  {lefts[name].ljust(width)}{text}{suffix}")
    return "\n".join(lines)


def _valid_instance_id(value: str) -> bool:
    return 1 <= len(value) <= 64 and all(c == "-" or c.isalnum() for c in value)


class Simulator:
    """One simulated Firecracker process: logger, metrics, VMM and API server."""

    def __init__(self, args: Args) -> None:
        self.args = args
        self.instance_id = args.get("id") or DEFAULT_ID
        self.logger = Logger(self.instance_id)
        self.metrics = Metrics()
        self.loop = EventLoop()
        self.exit_code = 0
        payload = args.get("http-api-max-payload-size") or str(DEFAULT_PAYLOAD_LIMIT)
        self.payload_limit = int(payload)
        mmds_limit = args.get("mmds-size-limit")
        period = float(os.environ.get("FIRECRACKER_SIM_METRICS_PERIOD_S", METRICS_PERIOD_S))
        self.vmm = Vmm(self.instance_id, self.logger, self.metrics, self.loop,
                       self.request_exit, int(mmds_limit) if mmds_limit else self.payload_limit,
                       period)
        self.server: ApiServer | None = None

    def request_exit(self, code: int) -> None:
        self.exit_code = code
        if self.server is not None:
            self.server.stop_listening()
        self.loop.stop()

    def fail(self, message: str, debug: str, code: int = EXIT_GENERIC) -> int:
        self.logger.error(message, "main")
        print(f"Error: {debug}", file=sys.stderr, flush=True)
        self.logger.error(f"Firecracker exiting with error. exit_code={code}", "main")
        return code

    def run(self) -> int:
        args = self.args
        level = args.get("level")
        if level is not None and level.lower() not in LEVELS:
            self.logger.error(f"Invalid value for logger level: Failed to parse string to level "
                              f"filter: {level}.Possible values: [Error, Warning, Info, Debug]",
                              "main")
            print(f'Error: InvalidLogLevel(LevelFilterFromStrError("{level}"))', file=sys.stderr)
            self.logger.error("Firecracker exiting with error. exit_code=152", "main")
            return EXIT_BAD_CONFIGURATION
        try:
            self.logger.configure(args.get("log-path"),
                                  LEVELS[level.lower()] if level else None,
                                  True if "show-level" in args.flags else None,
                                  True if "show-log-origin" in args.flags else None,
                                  args.get("module"))
        except OSError as e:
            return self.fail(f"Could not initialize logger: Failed to open target file: "
                             f"{io_error(e)}", "LoggerInitialization")
        self.logger.info(f"Running Firecracker v{VERSION}", "main")
        self._install_signal_handlers()
        metrics_path = args.get("metrics-path")
        if metrics_path is not None:
            try:
                self.metrics.init(metrics_path)
            except (OSError, MetricsAlreadyInitialized) as e:
                text = io_error(e) if isinstance(e, OSError) else str(e)
                return self.fail("Could not initialize metrics: Cannot initialize the metrics "
                                 f"system due to bad user input: {text}", "MetricsInitialization")
        config = self._read_file("config-file", "configuration")
        metadata = self._read_file("metadata", "mmds content")
        if "no-api" not in args.flags:
            code = self._start_api()
            if code is not None:
                return code
        if metadata is not None:
            self._apply_metadata(metadata)
        if config is not None:
            code = self._boot_from_config(config)
            if code is not None:
                return code
        self.loop.run()
        if self.server is not None:
            self.server.drain()
        sys.stdout.flush()
        return self.exit_code

    def _start_api(self) -> int | None:
        path = self.args.get("api-sock") or DEFAULT_API_SOCK
        if os.path.lexists(path):
            return self.fail(f"RunWithApiError error: Failed to open the API socket at: {path}. "
                             "Check that it is not already used.",
                             f"RunWithApi(FailedToBindSocket({rust_debug_str(path)}))")
        try:
            listener = bind_unix(path)
        except OSError as e:
            return self.fail("RunWithApiError error: Failed to bind and run the HTTP server: "
                             f"IO error: {io_error(e)}",
                             "RunWithApi(FailedToBindAndRunHttpServer(IOError))")
        self.logger.info(f"Listening on API socket ({rust_debug_str(path)}).", "main")
        handler = ApiHandler(self.vmm, self.logger, self.metrics, self.request_exit)
        self.server = ApiServer(self.loop, listener, handler, self.payload_limit)
        self.logger.info("API server started.")
        return None

    def _read_file(self, arg: str, what: str) -> bytes | None:
        path = self.args.get(arg)
        if path is None:
            return None
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as e:
            # Firecracker panics here, which aborts the process.
            self.logger.error(f"Firecracker panicked at src/firecracker/src/main.rs:\n"
                              f"Unable to open or read from the {what} file: {e}", "main")
            sys.stdout.flush()
            os.abort()

    def _apply_metadata(self, metadata: bytes) -> None:
        try:
            data = from_slice(MMDS_DATA, metadata)
        except JsonError:
            # Firecracker panics on metadata that is not JSON, which aborts the process.
            self.logger.error("Firecracker panicked at src/vmm/src/rpc_interface.rs:\n"
                              "MMDS error: metadata provided not valid json", "main")
            sys.stdout.flush()
            os.abort()
        self.vmm.resources.mmds_put(data)
        self.logger.info("Successfully added metadata to mmds from file", "main")

    def _boot_from_config(self, config: bytes) -> int | None:
        prefix = ("RunWithApiError error: Failed to build MicroVM from Json: Configuration for "
                  "VMM from one single json failed: ")
        try:
            cfg = from_slice(VMM_CONFIG, config)
        except JsonError as e:
            return self.fail(prefix + f"Invalid JSON: {e}",
                             f"RunWithApi(BuildFromJson(ParseFromJson(InvalidJson({e.debug()}))))")
        steps: list[tuple[str, Any]] = []
        if cfg["logger"] is not None:
            steps.append(("ConfigureLogger", cfg["logger"]))
        if cfg["metrics"] is not None:
            steps.append(("ConfigureMetrics", cfg["metrics"]))
        if cfg["machine-config"] is not None:
            steps.append(("UpdateMachineConfiguration", cfg["machine-config"]))
        if cfg["cpu-config"] is not None:
            steps.append(("PutCpuConfiguration", cfg["cpu-config"]))
        steps.append(("ConfigureBootSource", cfg["boot-source"]))
        steps += [("InsertBlockDevice", d) for d in cfg["drives"]]
        steps += [("InsertNetworkDevice", n) for n in cfg["network-interfaces"]]
        for key, action in (("vsock", "SetVsockDevice"), ("balloon", "SetBalloonDevice"),
                            ("mmds-config", "SetMmdsConfiguration"),
                            ("entropy", "SetEntropyDevice")):
            if cfg[key] is not None:
                steps.append((action, cfg[key]))
        steps += [("InsertPmemDevice", p) for p in cfg["pmem"]]
        if cfg["memory-hotplug"] is not None:
            steps.append(("SetMemoryHotplugDevice", cfg["memory-hotplug"]))
        try:
            for action, arg in steps:
                self.vmm.handle(action, arg)
        except ActionError as e:
            message = e.message
            for api_prefix, file_prefix in CONFIG_FILE_PREFIXES.items():
                if message.startswith(api_prefix):
                    message = file_prefix + message[len(api_prefix):]
            return self.fail(prefix + message, "RunWithApi(BuildFromJson(ParseFromJson))")
        try:
            self.vmm.handle("StartMicroVm")
        except ActionError as e:
            return self.fail("RunWithApiError error: Failed to build MicroVM from Json: Could "
                             f"not Start MicroVM from one single json: {e.message}",
                             "RunWithApi(BuildFromJson(StartMicroVM))")
        self.logger.info("Successfully started microvm that was configured from one single json",
                         "main")
        return None

    def _install_signal_handlers(self) -> None:
        # Firecracker installs no handler for these: they end the process by the signal.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)

        def on_sighup(signum: int, _frame: object) -> None:
            self.logger.error(f"Shutting down VM after intercepting signal {signum}, code 0.",
                              "main")
            sys.stdout.flush()
            os._exit(EXIT_SIGHUP)

        signal.signal(signal.SIGHUP, on_sighup)


def _print_exit(message_code: int, instance_id: str = DEFAULT_ID) -> None:

    logger = Logger(instance_id)
    if message_code == 0:
        logger.info("Firecracker exiting successfully. exit_code=0", "main")
    else:
        logger.error(f"Firecracker exiting with error. exit_code={message_code}", "main")


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except ArgError as e:
        Logger(DEFAULT_ID).error(f"Arguments parsing error: {e}{SEE_HELP}", "main")
        print(f"Error: ParseArguments({e.debug})", file=sys.stderr)
        _print_exit(EXIT_ARG_PARSING)
        return EXIT_ARG_PARSING
    if "help" in args.flags or "version" in args.flags:
        print(f"Firecracker v{VERSION}\n")
        if "help" in args.flags:
            print(help_text())
        _print_exit(0)
        return 0
    if "snapshot-version" in args.flags:
        print(f"v{FORMAT_VERSION}")
        _print_exit(0)
        return 0
    described = args.get("describe-snapshot")
    if described is not None:
        return _describe_snapshot(described)
    instance_id = args.get("id") or DEFAULT_ID
    if not _valid_instance_id(instance_id):
        # Firecracker panics on an invalid id ("Invalid instance ID"), which aborts.
        print(f"Invalid instance ID: {instance_id!r}", file=sys.stderr, flush=True)
        os.abort()
    return Simulator(args).run()


def _describe_snapshot(path: str) -> int:
    try:
        print(describe(path))
    except (OSError, SnapshotFormatError) as e:
        Logger(DEFAULT_ID).error("When printing Snapshot Data format: Invalid data format "
                                 f"version of snapshot file: {e}", "main")
        print(f"Error: PrintSnapshotDataFormat({type(e).__name__})", file=sys.stderr)
        _print_exit(EXIT_GENERIC)
        return EXIT_GENERIC
    _print_exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
