"""The parent of one hypervisor process, which records how it ended.

Run by the agent as `python -I -S waiter.py [--join TASKS_FILE]... EXIT_FILE ARGV...` in a
session of its own: it writes itself into each cgroup v1 TASKS_FILE (so that its child is
born in the VM's cgroup; it exits 126 should one refuse it), starts ARGV as its only child,
waits for it and writes "PID STATUS" to EXIT_FILE (STATUS as subprocess reports it: the exit
code, or minus the signal that killed it).
Only a process's parent can learn its exit status, and a hypervisor outlives the agent
that started it (kill -9 included); this waiter outlives the agent too, so an agent that
adopted the hypervisor after a restart still learns how it died, as conmon and
containerd-shim do for containers. Standard library only, no site packages: it starts
in milliseconds and imports nothing of the agent.

Started ahead of need as `waiter.py --standby`, it waits for its work on stdin: one JSON
line {"args": [the arguments above], "stdout": PATH, "stderr": PATH or null, "cwd": PATH or
null, "env": {...} or null}. So the interpreter's start (10-20 ms on a busy host) is off the
path of a VM's create. A standby whose stdin closes first (its agent is gone) just exits.
"""

import json
import os
import sys

_APPEND = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC


def main() -> None:
    args, env = sys.argv[1:], None
    if args == ["--standby"]:
        line = sys.stdin.buffer.readline()
        if not line:
            return
        request = json.loads(line)
        _take_streams(request["stdout"], request.get("stderr"), request.get("cwd"))
        args, env = request["args"], request.get("env")
    while args[0] == "--join":
        tasks, args = args[1], args[2:]
        try:
            with open(tasks, "w") as f:
                f.write("0")  # this thread, the only one: not by pid, see agent.cgroups
        except OSError as e:
            os.write(2, f"cannot join the cgroup of {tasks}: {e}\n".encode())
            sys.exit(126)
    exit_file, argv = args[0], args[1:]
    pid = os.fork()
    if pid == 0:
        try:
            if env is None:
                os.execvp(argv[0], argv)
            else:
                os.execvpe(argv[0], argv, env)
        except OSError as e:
            os.write(2, f"cannot run {argv[0]}: {e}\n".encode())
        os._exit(127)
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    try:
        tmp = f"{exit_file}.tmp"
        with open(tmp, "w") as f:
            f.write(f"{pid} {os.waitstatus_to_exitcode(status)}\n")
        os.replace(tmp, exit_file)
    except OSError:
        pass  # the VM's directory is gone: nobody asks any more


def _take_streams(stdout: str, stderr: str | None, cwd: str | None) -> None:
    """What a freshly started waiter gets from the agent: stdin from /dev/null, stdout
    (the guest's console) and stderr (the hypervisor's log, else stdout) appended to
    their files."""
    _dup_onto(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC), 0)
    _dup_onto(os.open(stdout, _APPEND, 0o666), 1)
    if stderr:
        _dup_onto(os.open(stderr, _APPEND, 0o666), 2)
    else:
        os.dup2(1, 2)
    if cwd:
        os.chdir(cwd)


def _dup_onto(fd: int, target: int) -> None:
    os.dup2(fd, target)  # the copy is inheritable, the original (CLOEXEC) is closed
    os.close(fd)


if __name__ == "__main__":
    main()
