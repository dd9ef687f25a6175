"""Firecracker's command line: its arguments, its own parser rules and the --help text."""

from __future__ import annotations

DEFAULT_API_SOCK = "/run/firecracker.socket"
DEFAULT_ID = "anonymous-instance"
DEFAULT_PAYLOAD_LIMIT = 51200

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
