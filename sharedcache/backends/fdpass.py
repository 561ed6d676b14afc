"""Handing file descriptors to attachers over a Unix socket (SCM_RIGHTS), same uid only.

The owner runs a small server thread on a 0600 socket in the 0700 entry directory;
each peer's uid is checked with SO_PEERCRED before any fd leaves the process.
Messages are JSON; fds go in batches below the kernel's per-message limit.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any, Callable

from ..errors import ArenaError, DriverError, HandoverError, OwnerGone

log = logging.getLogger(__name__)
PROTOCOL = 1
_BATCH = 200  # SCM_MAX_FD is 253
_MSG = 65536
_MAX_PATH = 107  # sun_path holds 108 bytes with its terminating NUL


def _check_path(path: Path) -> None:
    if len(os.fsencode(path)) > _MAX_PATH:
        raise ArenaError(f"socket path {path} is longer than the {_MAX_PATH} bytes a Unix socket address holds.",
                         hint="Use a shorter cache.dir or cache.key.")


def peer_uid(conn: socket.socket) -> int:
    _pid, uid, _gid = struct.unpack("iII", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return uid


def uid_allowed(uid: int) -> bool:
    """Only the owner's own user may receive its memory."""
    return uid == os.getuid()


class FdServer:
    """Serves `payload()` (a JSON header and fds) to each same-uid peer, one at a time."""

    def __init__(self, path: Path, payload: Callable[[], tuple[dict[str, Any], list[int]]]) -> None:
        _check_path(path)
        self.path, self._payload = path, payload
        self._stop = threading.Event()
        self._busy = threading.Lock()  # held while answering: close() never pulls fds from under a send
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        old = os.umask(0o177)
        try:
            self._sock.bind(str(path))
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self._sock.listen(64)
        self._sock.settimeout(0.2)
        self._thread = threading.Thread(target=self._serve, name=f"sharedcache-fd-{path.name}", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except socket.timeout:
                continue
            except OSError as e:  # EMFILE and friends: back off instead of spinning
                log.warning("fd server on %s cannot accept: %s", self.path, e)
                self._stop.wait(0.2)
                continue
            with conn, self._busy:
                if self._stop.is_set():
                    return
                try:
                    conn.settimeout(5)
                    self._answer(conn, time.perf_counter())
                except Exception as e:  # noqa: BLE001 - one bad peer must not stop the server; logged
                    log.warning("fd server on %s: a peer failed: %s", self.path, e)

    def _answer(self, conn: socket.socket, accepted: float) -> None:
        uid = peer_uid(conn)
        if not uid_allowed(uid):
            log.warning("refused a peer of uid %d on %s", uid, self.path)
            conn.send(json.dumps({"v": PROTOCOL, "ok": False,
                                  "error": f"peer uid {uid} is not the owner's uid {os.getuid()}"}).encode(),
                      socket.MSG_NOSIGNAL)
            return
        header, fds = self._payload()
        header = {**header, "answered_in_s": time.perf_counter() - accepted}
        batches = [fds[i:i + _BATCH] for i in range(0, len(fds), _BATCH)] or [[]]
        for i, batch in enumerate(batches):
            meta = {"v": PROTOCOL, "ok": True, "fds": len(fds), **(header if i == 0 else {})}
            socket.send_fds(conn, [json.dumps(meta).encode()], batch, socket.MSG_NOSIGNAL)

    def close(self) -> None:
        """Stop answering; when this returns no answer is in flight. Safe from any thread."""
        self._stop.set()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=10)
        with self._busy:
            self._sock.close()
            self.path.unlink(missing_ok=True)


def receive_fds(path: Path, timeout_s: float) -> tuple[dict[str, Any], list[int]]:
    """Ask the owner at `path` for its fds, within `timeout_s` in all. The caller owns (and must
    close) what comes back; on any failure every received fd is closed and ArenaError raised."""
    _check_path(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    deadline = time.monotonic() + timeout_s
    fds: list[int] = []
    t0 = time.perf_counter()
    try:
        sock.settimeout(timeout_s)
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise OwnerGone(f"no owner answers at {path} ({e.strerror}); its memory can no longer be imported.",
                            hint="Start the prefill (or a holder) again, then attach.") from e
        except OSError as e:
            raise DriverError(f"cannot reach the owner at {path}: {e.strerror or e}.", call="connect", code=e.errno,
                              hint="Attach as the same user as the owner, with access to cache.dir.") from e
        connected = time.perf_counter()
        header: dict[str, Any] | None = None
        while header is None or len(fds) < header["fds"]:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise HandoverError(f"the owner at {path} did not hand over its handles within {timeout_s:g}s.",
                                    hint="Check that the owner is not stopped, or raise cache.handle_timeout_s.")
            sock.settimeout(remaining)
            msg, got, flags, _addr = socket.recv_fds(sock, _MSG, _BATCH)
            fds.extend(got)
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                raise HandoverError(f"a message from the owner at {path} was truncated.")
            if not msg:
                raise OwnerGone(f"the owner at {path} hung up after {len(fds)} handles.")
            meta = json.loads(msg)
            if not isinstance(meta, dict) or meta.get("v") != PROTOCOL:
                raise HandoverError(f"the owner at {path} speaks another protocol ({str(meta)[:80]}); we speak "
                                    f"{PROTOCOL}.", hint="Run the same sharedcache version on both sides.")
            if not meta.get("ok"):
                raise HandoverError(f"the owner at {path} refused us: {meta.get('error')}.")
            if header is None:
                if type(meta.get("fds")) is not int or meta["fds"] < 0:
                    raise HandoverError(f"the owner at {path} sent a malformed header.")
                header = meta
            if len(fds) > header["fds"]:
                raise HandoverError(f"the owner at {path} sent more handles than it announced.")
        header["connect_s"] = connected - t0
        return header, fds
    except (OSError, ValueError, RecursionError) as e:  # timeouts, bad JSON: the owner's fault, not ours
        for fd in fds:
            os.close(fd)
        raise _receive_failed(path, e) from e
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    finally:
        sock.close()


def _receive_failed(path: Path, e: BaseException) -> ArenaError:
    """The error for a failure while receiving: the owner went away, the handover broke down (a timeout,
    a message that is not our JSON), or the system refused the receive."""
    message = f"receiving handles from the owner at {path} failed: {e}."
    if isinstance(e, (ConnectionResetError, BrokenPipeError)):
        return OwnerGone(message)
    if isinstance(e, OSError) and not isinstance(e, TimeoutError):
        return DriverError(message, call="recvmsg", code=e.errno)
    return HandoverError(message)
