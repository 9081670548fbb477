"""Trace file paths: checked before any work starts, unique default names, and files that
appear whole (a temporary file beside the target, renamed over it) with the user's umask."""

import os
import stat
import tempfile
import time


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode(private: bool) -> int:
    """0666 (0600 when the trace holds prompt or output text) less the umask."""
    return (0o600 if private else 0o666) & ~current_umask()


def default_trace_path(directory: str = ".") -> str:
    now = time.time()
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    return os.path.abspath(os.path.join(directory, f"otvllm-trace-{stamp}-{int(now * 1000) % 1000:03d}-"
                                                   f"{os.getpid()}.json"))


def check_trace_path(path: str) -> str:
    """The absolute path, or ValueError if a trace could not be written there."""
    if not path:
        raise ValueError("empty trace file path")
    path = os.path.abspath(path)
    if os.path.lexists(path):
        mode = os.stat(path).st_mode if os.path.exists(path) else 0
        if not stat.S_ISREG(mode):
            kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else
                    "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode)
                    else "a broken link" if not mode else "not a regular file")
            raise ValueError(f"trace file {path} exists and is {kind}: give the path of a regular file")
    problem = directory_problem(path)
    if problem:
        raise ValueError(f"cannot write trace file {path}: {problem}")
    return path


def directory_problem(path: str) -> str | None:
    """Why a file could not be created at absolute `path` for want of its directory, or None."""
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        return f"directory {directory} does not exist"
    if not os.access(directory, os.W_OK | os.X_OK):
        return f"directory {directory} is not writable"
    return None


def write_atomically(path: str, data: bytes, mode: int) -> None:
    """Write `data` to a temporary file in `path`'s directory, then rename it over `path`."""
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
