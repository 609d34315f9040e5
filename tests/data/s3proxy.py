"""A counting TCP proxy in front of the test S3 server: what crossed it, and a stop that
refuses every later connection and cuts the open ones (the S3 server, as far as a client
behind the proxy can tell, is gone). ``hold_after`` stalls each response after that many
bytes instead (a download that never finishes, for killing a worker mid-shard)."""

from __future__ import annotations

import contextlib
import socket
import threading
from urllib.parse import urlparse


class CountingProxy:
    def __init__(self, upstream: str, hold_after: int | None = None):
        url = urlparse(upstream)
        self.upstream = (url.hostname, url.port)
        self.hold_after = hold_after
        self.lock = threading.Lock()
        self.bytes_down = 0  # response bytes, server -> client
        self.requests = 0  # GET/PUT/HEAD/... request lines, client -> server
        self.gets = 0
        self.stopped = threading.Event()
        self.sockets: list[socket.socket] = []
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def snapshot(self) -> tuple[int, int, int]:
        with self.lock:
            return self.bytes_down, self.requests, self.gets

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if self.stopped.is_set():
                client.close()
                continue
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        with contextlib.suppress(OSError), client, socket.create_connection(self.upstream) as up:
            with self.lock:
                self.sockets += [client, up]
            threading.Thread(target=self._requests, args=(client, up), daemon=True).start()
            sent = 0
            while data := up.recv(65536):
                if self.hold_after is not None and sent + len(data) > self.hold_after:
                    client.sendall(data[: max(0, self.hold_after - sent)])
                    self.stopped.wait()  # never more bytes
                    return
                client.sendall(data)
                sent += len(data)
                with self.lock:
                    self.bytes_down += len(data)

    def _requests(self, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                # requests are small and start a read on a kept-alive connection
                for verb in (b"GET ", b"PUT ", b"HEAD ", b"POST ", b"DELETE "):
                    if data.startswith(verb):
                        with self.lock:
                            self.requests += 1
                            self.gets += verb == b"GET "
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)

    def stop(self) -> None:
        """Refuse new connections and cut every open one."""
        self.stopped.set()
        self.server.close()
        with self.lock:
            for s in self.sockets:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
