"""Domain errors. Every layer below the servicers raises these; driver.csi.status maps them to gRPC
codes in one table. Messages are for people: say what was wrong and what to do about it."""

from __future__ import annotations


class StowageError(Exception):
    """Base class of every error the driver reports on purpose."""


class InvalidArgument(StowageError):
    """The request is malformed or asks for something the driver never supports."""


class NotFound(StowageError):
    """A volume, snapshot, node or path named by the request does not exist."""


class AlreadyExists(StowageError):
    """The name or target is in use with arguments that are not compatible with this request."""


class FailedPrecondition(StowageError):
    """The system is not in a state where the operation can run (in use, published elsewhere…)."""


class ResourceExhausted(StowageError):
    """The pool or the node cannot hold what was asked for."""


class OutOfRange(StowageError):
    """A capacity range the driver cannot satisfy."""


class Aborted(StowageError):
    """Another operation on the same volume, snapshot or name is in progress; retry later."""


class Unavailable(StowageError):
    """The pool or its metadata store cannot be used right now."""


class PermissionDenied(StowageError):
    """A service the driver depends on (an object store) refused its credentials."""


class DataLoss(StowageError):
    """Stored data is missing or damaged beyond what the driver can repair (a backup chunk)."""


class Unimplemented(StowageError):
    """The RPC is not served in this mode."""


class Internal(StowageError):
    """Something the driver did failed in a way the caller cannot fix (a command, the kernel)."""


class CommandFailed(Internal):
    """An external command exited non-zero."""

    def __init__(self, argv: list[str], returncode: int, stdout: str, stderr: str) -> None:
        self.argv = argv
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        tail = (stderr.strip() or stdout.strip())[-400:]
        super().__init__(f"{argv[0]} exited with status {returncode}: {tail}")
