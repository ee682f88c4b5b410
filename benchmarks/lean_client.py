"""A blob GET client that costs little per byte: what a server can send when the client is not the limit.

wrk reads 8 KiB per read(2) and parses every byte: on a 2-core machine the
client's own CPU caps a fast plain-HTTP server (nginx included). Here each
connection is a process that reads the body into one 1 MiB buffer with
recv_into and only counts it, over keep-alive HTTP/1.1, until the run's end.

Only the stdlib. Plain HTTP on loopback.
"""
import multiprocessing
import socket
import time
import urllib.parse

BUFFER = 1 << 20


def _read_head(sock, pending):
    """(status, Content-Length, bytes after the head) of one response."""
    while b"\r\n\r\n" not in pending:
        data = sock.recv(65536)
        if not data:
            raise OSError("the server closed the connection before the response's head")
        pending += data
    head, rest = pending.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = None
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    if length is None:
        raise OSError(f"a response without Content-Length (status {status})")
    return status, length, rest


def _connection(host, port, path, start, deadline, out):
    """One connection's loop: (bytes read, responses finished, error) into ``out``."""
    request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
    buffer = bytearray(BUFFER)
    view = memoryview(buffer)
    total = finished = 0
    error = None
    try:
        with socket.create_connection((host, port)) as sock:
            delay = start - time.time()
            if delay > 0:
                time.sleep(delay)
            while time.time() < deadline:
                sock.sendall(request)
                status, length, rest = _read_head(sock, b"")
                if status != 200:
                    error = f"status {status}"
                    break
                left = length - len(rest)
                total += len(rest)
                while left > 0 and time.time() < deadline:
                    n = sock.recv_into(view, min(BUFFER, left))
                    if not n:
                        raise OSError(f"the body ended {left} bytes short")
                    left -= n
                    total += n
                if left == 0:
                    finished += 1
    except OSError as e:
        error = str(e)
    out.put((total, finished, error))


def lean_get(url, conns, seconds):
    """(MB/s with MB = 10^6 bytes, responses finished, error or None) of ``conns`` connections
    reading ``url`` for ``seconds``."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http":
        return None, None, "the lean client speaks plain HTTP only"
    context = multiprocessing.get_context("fork")
    out = context.Queue()
    start = time.time() + 0.5          # every connection open before the clock starts
    deadline = start + seconds
    workers = [context.Process(target=_connection, args=(parts.hostname, parts.port, parts.path or "/",
                                                         start, deadline, out))
               for _ in range(conns)]
    for worker in workers:
        worker.start()
    results = [out.get(timeout=seconds + 60) for _ in workers]
    for worker in workers:
        worker.join()
    errors = [e for _, _, e in results if e]
    total = sum(r[0] for r in results)
    finished = sum(r[1] for r in results)
    if errors:
        return None, finished, f"{len(errors)} of {conns} connections failed: {errors[0]}"
    return round(total / 1e6 / seconds, 1), finished, None
