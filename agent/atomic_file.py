"""Replacing a small file's content at once: whoever reads it (an agent restarted after a
crash included) finds the old content or the new, never a mix.

The usual way, a rename over the old file, makes ext4 write out the new file's blocks first
(its auto_da_alloc safeguard): 0.08-0.13 ms per write on a virtio disk, where a VM's create
and boot write about ten such files. Exchanging the two names (renameat2 RENAME_EXCHANGE)
is just as atomic and skips that; the old content, now under the temporary name, is then
unlinked. Where the call or the filesystem lacks the exchange, a plain rename does the job.

A file that only ever holds one record of a fixed width is cheaper still: one write over
its bytes (`overwrite_record`) is as atomic for a writer killed at any point, and makes no
new inode and no rename.
"""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = getattr(_libc, "renameat2", None)
# errnos that mean "no exchange here": the kernel, the C library or the filesystem lacks it.
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP}


def replace_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    if _exchange(tmp, path):
        tmp.unlink()
    else:
        os.replace(tmp, path)


def _exchange(a: Path, b: Path) -> bool:
    """Swap the two names; False where that cannot be done (b missing included)."""
    global _renameat2
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        _renameat2 = None  # not on this host: plain renames from now on
    elif err != errno.ENOENT:
        raise OSError(err, os.strerror(err), str(b))
    return False


def overwrite_record(path: Path, record: str) -> None:
    """Write record over the file's first bytes in one write. For files whose records all
    have record's width: a longer file (none of those) is replaced whole instead."""
    data = record.encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        if os.fstat(fd).st_size <= len(data):
            os.pwrite(fd, data, 0)
            return
    finally:
        os.close(fd)
    replace_text(path, record)
