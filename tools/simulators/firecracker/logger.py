"""Firecracker's log lines: format, level filter and target.

Lines look like `2026-11-27T11:31:29.504187235 [anonymous-instance:fc_api] text`,
optionally with `:LEVEL` and `:file:line` inside the brackets. They go to
stdout until a log path is configured, then to that file, which is opened the
way Firecracker opens it: read-write, created if missing, neither truncated nor
appended to, so writing starts at offset 0.
"""

from __future__ import annotations

import os
import sys
import time

# log::Level order: a message shows when its level <= the filter.
LEVEL_RANK = {"Off": 0, "Error": 1, "Warn": 2, "Info": 3, "Debug": 4, "Trace": 5}
LEVEL_TAG = {1: "ERROR", 2: "WARN", 3: "INFO", 4: "DEBUG", 5: "TRACE"}
ERROR, WARN, INFO, DEBUG = 1, 2, 3, 4

# Source files the messages come from in Firecracker, shown with show_log_origin.
ORIGIN_BY_THREAD = {
    "main": "src/firecracker/src/main.rs",
    "fc_api": "src/firecracker/src/api_server/mod.rs",
    "fc_vcpu 0": "src/vmm/src/vstate/vcpu.rs",
}
# Rust module paths, matched by a `module` filter.
MODULE_BY_THREAD = {
    "main": "firecracker",
    "fc_api": "firecracker::api_server",
    "fc_vcpu 0": "vmm::vstate::vcpu",
}


def open_nonblocking(path: str) -> int:
    """Firecracker's open_file_nonblock: O_RDWR | O_CREAT | O_NONBLOCK, mode 0666."""
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC, 0o666)


def local_timestamp() -> str:
    now = time.time_ns()
    seconds, nanos = divmod(now, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(seconds)) + f".{nanos:09d}"


class Logger:
    def __init__(self, instance_id: str) -> None:
        self.instance_id = instance_id
        self.max_level = INFO
        self.show_level = False
        self.show_origin = False
        self.module: str | None = None
        self.target_fd: int | None = None
        self.missed = 0

    def configure(self, log_path: str | None = None, level: str | None = None,
                  show_level: bool | None = None, show_log_origin: bool | None = None,
                  module: str | None = None) -> None:
        """Logger::update: the level resets to Info when not given; OSError on a bad path."""
        self.max_level = LEVEL_RANK[level] if level is not None else INFO
        if log_path is not None:
            fd = open_nonblocking(log_path)
            if self.target_fd is not None:
                os.close(self.target_fd)
            self.target_fd = fd
        if show_level is not None:
            self.show_level = show_level
        if show_log_origin is not None:
            self.show_origin = show_log_origin
        if module is not None:
            self.module = module

    def log(self, level: int, message: str, thread: str = "fc_api") -> None:
        if level > self.max_level:
            return
        if self.module is not None and not MODULE_BY_THREAD.get(thread, "").startswith(
                self.module):
            return
        tag = f":{LEVEL_TAG[level]}" if self.show_level else ""
        origin = f":{ORIGIN_BY_THREAD.get(thread, '?')}:?" if self.show_origin else ""
        line = f"{local_timestamp()} [{self.instance_id}:{thread}{tag}{origin}] {message}\n"
        data = line.encode()
        try:
            if self.target_fd is not None:
                os.write(self.target_fd, data)
            else:
                sys.stdout.buffer.write(data)
                sys.stdout.buffer.flush()
        except OSError:
            self.missed += 1

    def error(self, message: str, thread: str = "fc_api") -> None:
        self.log(ERROR, message, thread)

    def warn(self, message: str, thread: str = "fc_api") -> None:
        self.log(WARN, message, thread)

    def info(self, message: str, thread: str = "fc_api") -> None:
        self.log(INFO, message, thread)

    def debug(self, message: str, thread: str = "fc_api") -> None:
        self.log(DEBUG, message, thread)
