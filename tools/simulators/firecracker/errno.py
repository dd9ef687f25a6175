"""OS error texts as Firecracker prints them.

Firecracker is a static musl binary, so `std::io::Error` shows musl's strerror
texts ("Address in use", "Resource busy"), not glibc's, followed by
"(os error N)".
"""

from __future__ import annotations

import errno
import os

MUSL_STRERROR = {
    errno.EILSEQ: "Illegal byte sequence",
    errno.EDOM: "Domain error",
    errno.ERANGE: "Result not representable",
    errno.ENOTTY: "Not a tty",
    errno.EACCES: "Permission denied",
    errno.EPERM: "Operation not permitted",
    errno.ENOENT: "No such file or directory",
    errno.ESRCH: "No such process",
    errno.EEXIST: "File exists",
    errno.EOVERFLOW: "Value too large for data type",
    errno.ENOSPC: "No space left on device",
    errno.ENOMEM: "Out of memory",
    errno.EBUSY: "Resource busy",
    errno.EINTR: "Interrupted system call",
    errno.EAGAIN: "Resource temporarily unavailable",
    errno.ESPIPE: "Invalid seek",
    errno.EXDEV: "Cross-device link",
    errno.EROFS: "Read-only file system",
    errno.ENOTEMPTY: "Directory not empty",
    errno.ECONNRESET: "Connection reset by peer",
    errno.ETIMEDOUT: "Operation timed out",
    errno.ECONNREFUSED: "Connection refused",
    errno.EHOSTDOWN: "Host is down",
    errno.EHOSTUNREACH: "Host is unreachable",
    errno.EADDRINUSE: "Address in use",
    errno.EPIPE: "Broken pipe",
    errno.EIO: "I/O error",
    errno.ENXIO: "No such device or address",
    errno.ENOTBLK: "Block device required",
    errno.ENODEV: "No such device",
    errno.ENOTDIR: "Not a directory",
    errno.EISDIR: "Is a directory",
    errno.ETXTBSY: "Text file busy",
    errno.ENOEXEC: "Exec format error",
    errno.EINVAL: "Invalid argument",
    errno.E2BIG: "Argument list too long",
    errno.ELOOP: "Symbolic link loop",
    errno.ENAMETOOLONG: "Filename too long",
    errno.ENFILE: "Too many open files in system",
    errno.EMFILE: "No file descriptors available",
    errno.EBADF: "Bad file descriptor",
    errno.ECHILD: "No child process",
    errno.EFAULT: "Bad address",
    errno.EFBIG: "File too large",
    errno.EMLINK: "Too many links",
    errno.ENOLCK: "No locks available",
    errno.EDEADLK: "Resource deadlock would occur",
    errno.ECANCELED: "Operation canceled",
    errno.ENOSYS: "Function not implemented",
    errno.ENOTSOCK: "Not a socket",
    errno.EDESTADDRREQ: "Destination address required",
    errno.EMSGSIZE: "Message too large",
    errno.EPROTOTYPE: "Protocol wrong type for socket",
    errno.ENOPROTOOPT: "Protocol not available",
    errno.EPROTONOSUPPORT: "Protocol not supported",
    errno.EOPNOTSUPP: "Not supported",
    errno.EAFNOSUPPORT: "Address family not supported by protocol",
    errno.EADDRNOTAVAIL: "Address not available",
    errno.ENETDOWN: "Network is down",
    errno.ENETUNREACH: "Network unreachable",
    errno.ECONNABORTED: "Connection aborted",
    errno.ENOBUFS: "No buffer space available",
    errno.EISCONN: "Socket is connected",
    errno.ENOTCONN: "Socket not connected",
    errno.EALREADY: "Operation already in progress",
    errno.EINPROGRESS: "Operation in progress",
    errno.ESTALE: "Stale file handle",
    errno.EDQUOT: "Quota exceeded",
}


def io_error(err: OSError) -> str:
    """std::io::Error's Display for an OS error, with musl's text."""
    code = err.errno or 0
    return f"{MUSL_STRERROR.get(code) or os.strerror(code)} (os error {code})"
