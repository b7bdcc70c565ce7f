"""A gunicorn gthread worker that reads each request in full before a thread takes it: slow clients cost no thread.

gunicorn's gthread worker hands a connection to a request thread as soon as its first bytes arrive,
and the thread then blocks until the rest of the request comes. Eight clients that send half a
request and stop hold all eight threads, and nobody else is answered. This worker reads the request
head and body in its event loop instead (as nginx does), without blocking, and hands the request to
a thread only once all of it is there. A request that is not complete within `read_timeout` seconds
(the head in all, the body without progress or slower than MIN_BODY_RATE on average) is answered
408 and closed; an idle connection that
sends nothing is closed. In the request thread the socket keeps a timeout too, for the bodies too
large to read ahead and for clients that stop reading the answer.
"""
from __future__ import annotations

import errno
import json
import os
import re
import selectors
import signal
import time
from functools import partial

from gunicorn import util
from gunicorn.workers.base import Worker
from gunicorn.workers.gthread import TConn, ThreadWorker

READ_CHUNK = 64 * 1024
MAX_HEAD_BYTES = 64 * 1024              # request line and headers; longer heads answer 431
MAX_READ_AHEAD_BODY = 32 * 1024 * 1024  # larger bodies are read by the request thread (the default upload limit is 20 MB)
DEFAULT_READ_TIMEOUT_S = 10.0
# A body must also come at this many bytes a second on average (Apache's mod_reqtimeout MinRate): each byte buys the
# read timeout 1/MIN_BODY_RATE s more. Without it a client dripping a byte a second never stalled, and 64 of them held
# every connection a worker takes, locking new clients out. A slow real upload (a phone on 2G, 5 KB/s) is ten times it.
MIN_BODY_RATE = 500

_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")


def _error_response(status: int, reason: str, code: str, message: str) -> bytes:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


# gunicorn answers what its HTTP parser refuses (a malformed request line or header, a negative Content-Length)
# with an HTML page of its own; in this worker's process the same answer is JSON, as every other error is
_PARSER_ERROR_CODES = {400: "bad_request", 403: "forbidden", 414: "request_line_too_long",
                       417: "expectation_failed", 431: "headers_too_large", 500: "internal_error", 501: "not_implemented"}


def _write_json_error(sock, status_int: int, reason: str, mesg: str) -> None:  # noqa: ANN001 - gunicorn's write_error
    prefix = os.environ.get("SCRIPT_NAME", "").rstrip("/")
    if status_int == 500 and prefix and "does not start with SCRIPT_NAME" in str(mesg):
        # served under a sub-path (SCRIPT_NAME=/pics) and asked outside it: no such address, not a server failure
        status_int, reason, mesg = 404, "Not Found", f"no such resource: this server answers under {prefix}/"
        util.write_nonblock(sock, _error_response(status_int, reason, "not_found", mesg))
        return
    code = _PARSER_ERROR_CODES.get(status_int, "bad_request")
    if status_int < 500:
        message = "the request could not be read as HTTP/1.1" + (f": {mesg}" if mesg else "")
    else:
        message = mesg or "the server failed on this request"
    util.write_nonblock(sock, _error_response(status_int, reason, code, message))


class RequestReadAhead:
    """The bytes of one HTTP/1.x request as they arrive, and whether they hold all of it yet.

    Only the framing is read here (Content-Length, Transfer-Encoding: chunked, Expect); anything
    malformed counts as complete, so that gunicorn's own parser refuses it with its usual answer.
    """

    def __init__(self, initial: bytes = b"", *, max_body: int = MAX_READ_AHEAD_BODY):
        self.data = bytearray(initial)
        self.max_body = max_body
        self.body_start = -1          # offset of the body once the head is complete
        self.length: int | None = None  # Content-Length
        self.chunked = False
        self.chunk_pos = 0            # offset of the next chunk-size line not yet walked
        self.expect_continue = False  # the client waits for "100 Continue" before sending the body
        self.complete = False
        if initial:
            self._update()

    def feed(self, data: bytes) -> bool:
        """Add bytes read from the socket. -> whether the request is now complete (or cannot be read ahead)."""
        self.data += data
        self._update()
        return self.complete

    @property
    def head_too_long(self) -> bool:   # still without its end past the limit, or ended past it (one read brought it)
        return len(self.data) > MAX_HEAD_BYTES if self.body_start < 0 else self.body_start - 4 > MAX_HEAD_BYTES

    @property
    def awaiting_body(self) -> bool:
        return self.body_start >= 0 and not self.complete

    def _update(self) -> None:
        if self.complete:
            return
        if self.body_start < 0:
            end = self.data.find(b"\r\n\r\n")
            if end < 0:
                self.complete = len(self.data) > MAX_HEAD_BYTES   # the worker answers 431
                return
            self.body_start = self.chunk_pos = end + 4
            if not self._read_head(bytes(self.data[:end])):
                self.complete = True       # malformed framing: gunicorn's parser answers 400
                return
        body = len(self.data) - self.body_start
        if self.chunked:
            self.complete = self._chunks_complete() or body > self.max_body
        elif self.length is None:
            self.complete = True           # no body
        else:
            # a body over the limit goes to the app at once: it answers 413 without reading it
            self.complete = body >= self.length or self.length > self.max_body

    def _read_head(self, head: bytes) -> bool:
        """Framing headers of the head. -> False when they are malformed."""
        lengths, codings = [], []
        for line in head.split(b"\r\n")[1:]:
            name, colon, value = line.partition(b":")
            if not colon:
                return False
            name, value = name.strip().lower(), value.strip()
            if name == b"content-length":
                lengths.append(value)
            elif name == b"transfer-encoding":
                codings.append(value.lower())
            elif name == b"expect" and value.lower() == b"100-continue":
                self.expect_continue = True
        if codings:
            if lengths or not b",".join(codings).rstrip().endswith(b"chunked"):
                return False
            self.chunked = True
        elif lengths:
            if len(lengths) > 1 or not lengths[0].isdigit() or len(lengths[0]) > 18:
                return False
            self.length = int(lengths[0])
        return True

    def _chunks_complete(self) -> bool:
        """Walk the chunks that have arrived; True once the last chunk and the trailers are in."""
        data = self.data
        while True:
            eol = data.find(b"\r\n", self.chunk_pos)
            if eol < 0:
                return False
            size_field = bytes(data[self.chunk_pos:eol]).split(b";", 1)[0].strip()
            if not _CHUNK_SIZE.fullmatch(size_field):
                return True                # malformed: gunicorn's parser answers 400
            size = int(size_field, 16)
            if size == 0:
                return data.find(b"\r\n\r\n", eol) >= 0   # the empty line after the trailers, if any
            if eol + 2 + size + 2 > len(data):
                return False
            self.chunk_pos = eol + 2 + size + 2


class ReadAheadConn(TConn):
    """A connection with the next request read ahead by the event loop, and a timeout on its socket."""

    def __init__(self, cfg, sock, client, server, read_timeout: float):  # noqa: ANN001 - as gunicorn's TConn
        super().__init__(cfg, sock, client, server)
        self.read_timeout = read_timeout
        self.request: RequestReadAhead | None = None
        self.read_deadline = 0.0
        self.body_since = 0.0             # when the head had arrived and the body began
        self.continue_sent = False

    def init(self) -> None:
        """In the request thread, before the request is parsed: hand the bytes read ahead to the parser."""
        super().init()
        if self.request is not None:
            self.parser.unreader.unread(bytes(self.request.data))
            self.request = None
        self.sock.settimeout(self.read_timeout)   # every later read or write of this thread


class ReadAheadThreadWorker(ThreadWorker):
    """gthread, with requests read in full by the event loop before a thread takes them (see the module doc)."""

    read_timeout = DEFAULT_READ_TIMEOUT_S     # serve-images --read-timeout; set on a subclass by with_read_timeout()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reading_conns: set[ReadAheadConn] = set()

    def init_process(self) -> None:
        util.write_error = _write_json_error   # gunicorn's error pages, JSON here (in this worker process only)
        super().init_process()

    def handle_quit(self, sig, frame) -> None:  # noqa: ANN001 - a signal handler
        """Ctrl-C or SIGQUIT: exit now (gunicorn's base worker: the worker_int hook, then SystemExit).

        Not through gthread's own handler, which first shuts the thread pool down under the pool's lock: Ctrl-C
        reaches a worker twice (from the terminal, then as the server's SIGQUIT), and the second handler, run
        inside the first while it held that lock (or inside the event loop's submit(), which takes it too),
        waited on its own thread until the server killed the worker 10 s later. Later quit signals do nothing:
        the first is already exiting (a handler that does nothing, not SIG_IGN: a signal already caught when the
        handler changes would find SIG_IGN and print "Signal 3 ignored due to race condition" as an error). The
        request threads still finish what they hold at exit."""
        for quit_signal in (signal.SIGINT, signal.SIGQUIT):
            signal.signal(quit_signal, _already_quitting)
        Worker.handle_quit(self, sig, frame)

    def accept(self, listener) -> None:  # noqa: ANN001
        try:
            client_sock, client_addr = listener.accept()
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        conn = ReadAheadConn(self.cfg, client_sock, client_addr, listener.getsockname(), self.read_timeout)
        if self.cfg.is_ssl:      # the event loop cannot read TLS records; gthread's own handling, with the timeout
            client_sock.setblocking(True)
            self.enqueue_req(conn)
            return
        self._start_reading(conn)
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_readable, conn))

    def on_client_socket_readable(self, conn, client) -> None:  # noqa: ANN001 - a kept-alive connection
        if not isinstance(conn, ReadAheadConn):
            super().on_client_socket_readable(conn, client)
            return
        self.keepalived_conns.remove(conn)
        self._start_reading(conn)
        self.poller.modify(client, selectors.EVENT_READ, partial(self._on_readable, conn))
        self._on_readable(conn)

    def finish_request(self, conn, fs) -> None:  # noqa: ANN001
        # A keep-alive request whose body drain read ahead into the next request: read the rest of that
        # one in the event loop too, instead of letting a thread wait for it.
        if (isinstance(conn, ReadAheadConn) and self.alive and not fs.cancelled() and fs.exception() is None
                and fs.result() is True and conn.parser is not None and conn.parser.unreader.buf.getvalue()):
            pending = conn.parser.unreader.take_buffered()
            conn.sock.setblocking(False)
            self._start_reading(conn, pending)
            if conn.request.complete:
                self._dispatch(conn, registered=False)
            else:
                self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_readable, conn))
            return
        super().finish_request(conn, fs)

    def handle_request(self, req, conn):  # noqa: ANN001, ANN201
        try:
            return super().handle_request(req, conn)
        except TimeoutError:
            # the client stopped reading the answer (or sending a body too large to read ahead)
            self.log.info("closed the connection from %s: it stalled for %g s", _peer(conn), self.read_timeout)
            return False

    def murder_pending(self) -> None:
        """Runs about every second in the event loop: also 408 and close requests past their deadline."""
        super().murder_pending()
        now = time.monotonic()
        for conn in [c for c in self.reading_conns if c.read_deadline <= now or (not self.alive and not c.request.data)]:
            if conn.request.data and self.alive:
                self.log.info("closed the connection from %s: no complete request within %g s",
                              _peer(conn), self.read_timeout)
                self._refuse(conn, 408, "Request Timeout", "request_timeout",
                             f"the request did not arrive in full within {self.read_timeout:g} s")
            else:
                self._drop(conn)

    # the event loop's side

    def _start_reading(self, conn: ReadAheadConn, initial: bytes = b"") -> None:
        conn.request = RequestReadAhead(initial)
        conn.continue_sent = False
        conn.read_deadline = time.monotonic() + self.read_timeout
        self.reading_conns.add(conn)

    def _on_readable(self, conn: ReadAheadConn, _sock=None) -> None:  # noqa: ANN001
        try:
            data = conn.sock.recv(READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:                     # the client closed the connection (or reset it)
            if conn.request.awaiting_body:   # half-closed inside the body: it may still read an answer
                self._refuse(conn, 400, "Bad Request", "bad_request",
                             "the request body was cut short: the connection closed before all of it arrived")
            else:
                self._drop(conn)
            return
        request = conn.request
        had_head = request.body_start >= 0
        request.feed(data)
        if had_head:                     # a body may take long, as long as it keeps coming at MIN_BODY_RATE
            now, body = time.monotonic(), len(request.data) - request.body_start
            conn.read_deadline = min(now + self.read_timeout,
                                     conn.body_since + self.read_timeout + body / MIN_BODY_RATE)
        if request.head_too_long:
            self._refuse(conn, 431, "Request Header Fields Too Large", "headers_too_large",
                         f"the request line and headers are longer than {MAX_HEAD_BYTES} bytes")
        elif request.complete:
            self._dispatch(conn)
        elif request.awaiting_body:
            if not had_head:
                conn.body_since = time.monotonic()
                conn.read_deadline = conn.body_since + self.read_timeout
            if request.expect_continue and not conn.continue_sent and len(request.data) == request.body_start:
                conn.continue_sent = True  # gunicorn sends its own later; clients skip any number of 1xx answers
                _send_quietly(conn, b"HTTP/1.1 100 Continue\r\n\r\n")

    def _dispatch(self, conn: ReadAheadConn, registered: bool = True) -> None:
        self.reading_conns.discard(conn)
        if registered:
            self.poller.unregister(conn.sock)
        conn.data_ready = True           # gthread's handle() must not wait for data again
        conn.sock.setblocking(True)
        self.enqueue_req(conn)

    def _refuse(self, conn: ReadAheadConn, status: int, reason: str, code: str, message: str) -> None:
        _send_quietly(conn, _error_response(status, reason, code, message))
        self._drop(conn)

    def _drop(self, conn: ReadAheadConn) -> None:
        self.reading_conns.discard(conn)
        try:
            self.poller.unregister(conn.sock)
        except (KeyError, ValueError, OSError):
            pass
        self.nr_conns -= 1
        conn.close()


def _already_quitting(_signum: int, _frame: object) -> None:
    """A quit signal after the first: the worker is on its way out already."""


def _send_quietly(conn: TConn, data: bytes) -> None:
    """Best effort, without blocking the event loop: a client that does not read gets less."""
    try:
        conn.sock.send(data)
    except OSError:
        pass


def _peer(conn: TConn) -> str:
    client = conn.client
    return f"{client[0]}:{client[1]}" if isinstance(client, tuple) else str(client)


def with_read_timeout(seconds: float) -> type[ReadAheadThreadWorker]:
    """The worker class for gunicorn's worker_class setting, with its read timeout."""
    assert seconds > 0, "the read timeout must be positive"
    return type(ReadAheadThreadWorker.__name__, (ReadAheadThreadWorker,),
                {"read_timeout": float(seconds), "__module__": __name__})
