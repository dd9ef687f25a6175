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
"""

import os
import sys


def main() -> None:
    args = sys.argv[1:]
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
            os.execvp(argv[0], argv)
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


if __name__ == "__main__":
    main()
