"""The firecracker-sim process, started like Firecracker's main: logger, metrics, API server,
--config-file boot and signals, and `main`, the console script's entry point.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from tools.simulators.firecracker.api import ApiHandler
from tools.simulators.firecracker.cli import (
    DEFAULT_API_SOCK,
    DEFAULT_ID,
    DEFAULT_PAYLOAD_LIMIT,
    ArgError,
    Args,
    help_text,
    parse_args,
)
from tools.simulators.firecracker.errno import io_error
from tools.simulators.firecracker.http import ApiServer, EventLoop, bind_unix
from tools.simulators.firecracker.json_reader import JsonError
from tools.simulators.firecracker.logger import Logger
from tools.simulators.firecracker.metrics import Metrics, MetricsAlreadyInitialized
from tools.simulators.firecracker.resources import ActionError
from tools.simulators.firecracker.rust_fmt import rust_debug_str
from tools.simulators.firecracker.schemas import LEVELS, MMDS_DATA, VMM_CONFIG
from tools.simulators.firecracker.serde import from_slice
from tools.simulators.firecracker.snapshot import FORMAT_VERSION, SnapshotFormatError, describe
from tools.simulators.firecracker.vmm import METRICS_PERIOD_S, Vmm

VERSION = "1.14.2"
EXIT_GENERIC, EXIT_BAD_CONFIGURATION, EXIT_ARG_PARSING, EXIT_SIGHUP = 1, 152, 153, 156
SEE_HELP = " \\n\\nFor more information try --help."

# --config-file errors name the resource, not the API call.
CONFIG_FILE_PREFIXES = {
    "Balloon config error: ": "Balloon device error: ",
    "Drive config error: ": "Block device error: ",
    "Network config error: ": "Network device error: ",
    "Machine config error: ": "VM config error: ",
    "Vsock config error: ": "Vsock device error: ",
    "MMMDS config error: ": "MMDS config error: ",
}


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

