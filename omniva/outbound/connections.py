"""Connections to addresses resolved and checked beforehand (never to the name again),
every socket operation under one deadline over the whole exchange."""

from __future__ import annotations

import http.client
import io
import socket
import ssl
import time
from functools import cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing_extensions import Buffer

from omniva.outbound.errors import OutboundCode, OutboundError
from omniva.outbound.guard import _Target


class _Deadline:
    def __init__(self, seconds: float) -> None:
        self.at = time.monotonic() + seconds

    def remaining(self) -> float:
        left = self.at - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline passed")
        return left


class _DeadlineReader(io.RawIOBase):
    def __init__(self, sock: socket.socket, deadline: _Deadline) -> None:
        self._sock = sock
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Buffer) -> int:
        # A per-read timeout alone lets a server that drips a byte now and then hold the
        # fetch forever; every read only gets what is left of the whole deadline.
        self._sock.settimeout(self._deadline.remaining())
        return self._sock.recv_into(buffer)


class _DeadlineSocket:
    """The part of a socket http.client uses, with every operation under the deadline.

    close() leaves the socket open: http.client closes its connection as soon as the
    headers say Connection: close, while the body is still to be read; the request
    code closes the real socket when it is done.
    """

    def __init__(self, sock: socket.socket, deadline: _Deadline) -> None:
        self._sock = sock
        self._deadline = deadline

    def sendall(self, data: bytes) -> None:
        # Since Python 3.5 a socket timeout bounds the whole sendall, not each send.
        self._sock.settimeout(self._deadline.remaining())
        self._sock.sendall(data)

    def makefile(self, mode: str = "rb", *args: object, **kwargs: object) -> io.BufferedReader:
        return io.BufferedReader(_DeadlineReader(self._sock, self._deadline))

    def close(self) -> None:
        pass


@cache
def _default_ssl_context() -> ssl.SSLContext:
    return ssl.create_default_context()


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """An HTTP connection to addresses resolved and checked beforehand.

    http.client would resolve the host again in connect(); a DNS answer that changed
    since the check (rebinding, a TTL of 0) would then reach an address nobody checked.
    """

    def __init__(
        self, target: _Target, addresses: list[tuple[int, tuple]], deadline: _Deadline
    ) -> None:
        super().__init__(target.host, target.port)
        self._addresses = addresses
        self._deadline = deadline
        self.raw_sock: socket.socket | None = None

    def connect(self) -> None:
        last_error: OSError = ConnectionRefusedError("no address to connect to")
        for family, sockaddr in self._addresses:
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.settimeout(self._deadline.remaining())
                sock.connect(sockaddr)
            except OSError as exc:
                sock.close()
                last_error = exc
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.raw_sock = self._secure(sock)
            self.sock = _DeadlineSocket(self.raw_sock, self._deadline)
            return
        raise last_error

    def _secure(self, sock: socket.socket) -> socket.socket:
        return sock

    def close_socket(self) -> None:
        self.close()
        if self.raw_sock is not None:
            self.raw_sock.close()
            self.raw_sock = None


class _PinnedHTTPSConnection(_PinnedHTTPConnection):
    default_port = 443

    def __init__(
        self,
        target: _Target,
        addresses: list[tuple[int, tuple]],
        deadline: _Deadline,
        context: ssl.SSLContext,
    ) -> None:
        super().__init__(target, addresses, deadline)
        self._context = context

    def _secure(self, sock: socket.socket) -> socket.socket:
        try:
            sock.settimeout(self._deadline.remaining())
            # The name, not the address we connected to: SNI and the certificate check
            # are about the host the caller asked for.
            return self._context.wrap_socket(sock, server_hostname=self.host)
        except ssl.SSLCertVerificationError as exc:
            sock.close()
            raise OutboundError(
                OutboundCode.FETCH_FAILED,
                f"TLS certificate of {self.host!r} is not valid: {exc.verify_message}",
            ) from exc
        except (TimeoutError, ConnectionResetError):
            sock.close()
            raise
        except (ssl.SSLError, OSError) as exc:
            sock.close()
            raise OutboundError(
                OutboundCode.FETCH_FAILED, f"TLS handshake with {self.host!r} failed: {exc}"
            ) from exc
