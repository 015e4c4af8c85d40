"""drivesim's HTTP transport: a threading HTTP server that tracks its open connections so
:meth:`DriveSim.stop` can close them, and the request handler that reads each request
(applying the ``drop`` and ``slow`` faults and the body timeout), hands it to the
:class:`~tools.drivesim.server.DriveSim` and writes the reply."""
from __future__ import annotations

import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote, urlsplit

from tools.drivesim.protocol import _ApiError, _bad_request, _Reply, _Request, classify

if TYPE_CHECKING:
    from tools.drivesim.server import DriveSim

log = logging.getLogger("drivesim")


class _Server(ThreadingHTTPServer):
    daemon_threads = False        # server_close() joins the handler threads
    block_on_close = True

    def __init__(self, addr: tuple[str, int], sim: DriveSim) -> None:
        self.sim = sim
        self.live: set[socket.socket] = set()
        self.live_lock = threading.Lock()
        super().__init__(addr, _Handler)

    def close_connections(self) -> None:
        with self.live_lock:
            for sock in self.live:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "drivesim/1"
    disable_nagle_algorithm = True
    server: _Server

    def setup(self) -> None:
        super().setup()
        with self.server.live_lock:
            self.server.live.add(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass
        finally:
            with self.server.live_lock:
                self.server.live.discard(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def do_PUT(self) -> None:
        self._serve()

    def do_DELETE(self) -> None:
        self._serve()

    def do_PATCH(self) -> None:
        self._serve()

    def _read_body(self, n: int) -> tuple[bytes, bool]:
        """Up to ``n`` body bytes; False when the client went quiet or away before ``n``."""
        sim = self.server.sim
        buf = bytearray()
        self.connection.settimeout(sim.body_timeout)
        try:
            while len(buf) < n:
                piece = self.rfile.read1(min(n - len(buf), 1 << 20))
                if not piece:
                    break
                buf += piece
        except OSError:
            pass
        finally:
            try:
                self.connection.settimeout(None)
            except OSError:
                pass
        return bytes(buf), len(buf) == n

    def _serve(self) -> None:
        sim = self.server.sim
        url = urlsplit(self.path)
        headers = {k.lower(): v for k, v in self.headers.items()}
        req = _Request(self.command, unquote(url.path).lstrip("/"),
                       dict(parse_qsl(url.query, keep_blank_values=True)), headers, b"",
                       headers.get("host") or f"{sim.host}:{sim.port}")
        kind = classify(req.method, req.path, req.query, headers)
        sim._request_started(kind)
        try:
            self._serve_request(sim, req, kind, headers)
        finally:
            sim._request_ended(kind)

    def _serve_request(self, sim: DriveSim, req: _Request, kind: str, headers: dict[str, str]) -> None:
        fault = sim._take_fault(kind, f"{req.method} /{req.path}")
        try:
            length = int(headers.get("content-length") or 0)
        except ValueError:
            length = -1
        if length < 0:
            self._send(_bad_request("Invalid Content-Length").reply())
            self.close_connection = True
            return
        media = kind.startswith("upload") and kind != "upload_start"
        if fault is not None and fault.kind == "drop":
            limit = length if fault.after_bytes is None else min(fault.after_bytes, length)
            data, _ = self._read_body(limit)
            if media:
                with sim._lock:
                    sim._bytes_received += len(data)
            if kind == "upload_chunk" and fault.after_bytes is not None:
                sim._interrupted_chunk(req, data)
            self.close_connection = True
            return
        req.body, complete = self._read_body(length)
        if media:
            with sim._lock:
                sim._bytes_received += len(req.body)
        if not complete:
            if kind == "upload_chunk":
                sim._interrupted_chunk(req, req.body)
            self._send(_ApiError(408, "requestTimeout", f"Request body ended after "
                                 f"{len(req.body)} of {length} bytes").reply())
            self.close_connection = True
            return
        if fault is not None and fault.kind == "slow":
            if sim._stopping.wait(fault.delay):
                self.close_connection = True
                return
            fault = None
        try:
            reply = fault.error().reply() if fault is not None else sim._dispatch(req, kind)
        except Exception as e:                          # a bug here: say so, keep serving
            log.exception("drivesim: internal error")
            reply = _ApiError(500, "internalError", f"drivesim internal error: {e!r}").reply()
        self._send(reply)

    def _send(self, reply: _Reply) -> None:
        try:
            self.send_response(reply.status)
            for key, value in reply.headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(reply.body)))
            self.end_headers()
            self.wfile.write(reply.body)
        except OSError:
            self.close_connection = True
