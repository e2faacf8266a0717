#!/usr/bin/env python3
"""Helpers of bench/isolation.sh (issue 15), one per subcommand:

  upstream PORT       an upstream that misbehaves by path: a narinfo whose hash starts with
                      "d" is sent at 1 byte every 2 s; any other narinfo is a 404 after 1 s;
                      /nix-cache-info answers at once; everything else is a 404
  nars DIR N SIZE     writes N random NARs of SIZE bytes into DIR, named <nix32 sha256>.nar
                      as ncps wants them, and prints the names
  upload URL TOKEN F  PUTs file F to URL/nar/<name>
  probe URL LIST SECS SRC
                      the measured client: 4 threads, each on one keep-alive connection from
                      address SRC, GET a random NAR of LIST, then sleep 5 ms, for SECS seconds;
                      prints "p50_ms p99_ms max_ms count errors"
  drip-put URL TOKEN N   N slow uploaders: PUT bodies sent at 1 byte every 5 s (again when cut)
  slow-read URL PATH N   N slow readers: GET PATH read at 4 KiB/s (again when cut)
  drip-get URL N         N clients asking for dripping narinfos (30 s each, then another)
"""
import hashlib, http.client, os, random, socket, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

NIX32 = "0123456789abcdfghijklmnpqrsvwxyz"


def nix32(digest: bytes) -> str:
    n = len(digest) * 8
    out_len = (n + 4) // 5
    out = []
    for i in range(out_len - 1, -1, -1):
        b = i * 5
        j, k = b // 8, b % 8
        c = digest[j] >> k
        if j + 1 < len(digest):
            c |= digest[j + 1] << (8 - k)
        out.append(NIX32[c & 0x1F])
    return "".join(out)


class Upstream(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def do_GET(self):
        p = self.path
        if p == "/nix-cache-info":
            body = b"StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 50\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        if p.endswith(".narinfo") and p.startswith("/d"):
            body = (b"StorePath: /nix/store/" + p[1:33].encode() + b"-drip\nURL: nar/x.nar\n").ljust(540, b"x")
            self.send_response(200)
            self.send_header("Content-Type", "text/x-nix-narinfo")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            try:
                for b in body:
                    self.wfile.write(bytes([b]))
                    self.wfile.flush()
                    time.sleep(2)
            except OSError:
                pass
            return
        if p.endswith(".narinfo"):
            time.sleep(1)
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()


def upstream(port):
    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer.request_queue_size = 1024
    ThreadingHTTPServer(("127.0.0.1", int(port)), Upstream).serve_forever()


def nars(d, n, size):
    os.makedirs(d, exist_ok=True)
    for _ in range(int(n)):
        data = os.urandom(int(size))
        name = nix32(hashlib.sha256(data).digest()) + ".nar"
        with open(os.path.join(d, name), "wb") as f:
            f.write(data)
        print(name)


def upload(url, token, path):
    host, port = url.split("//")[1].split(":")
    with open(path, "rb") as f:
        data = f.read()
    c = http.client.HTTPConnection(host, int(port), timeout=120)
    c.request("PUT", "/nar/" + os.path.basename(path), body=data,
              headers={"Authorization": "Bearer " + token, "Content-Length": str(len(data))})
    r = c.getresponse()
    r.read()
    if r.status not in (200, 201, 204):
        sys.exit(f"upload {path}: {r.status}")


def probe(url, listfile, secs, src, conc="4"):
    host, port = url.split("//")[1].split(":")
    names = open(listfile).read().split()
    lat, errors = [], [0]
    lock = threading.Lock()
    end = time.monotonic() + float(secs)

    def run():
        c = None
        mine = []
        while time.monotonic() < end:
            try:
                if c is None:
                    c = http.client.HTTPConnection(host, int(port), timeout=30, source_address=(src, 0))
                t = time.monotonic()
                c.request("GET", "/nar/" + random.choice(names))
                r = c.getresponse()
                r.read()
                d = time.monotonic() - t
                if r.status != 200:
                    raise OSError(f"status {r.status}")
                mine.append(d)
            except Exception:
                with lock:
                    errors[0] += 1
                c = None
            time.sleep(0.005)
        with lock:
            lat.extend(mine)

    ts = [threading.Thread(target=run) for _ in range(int(conc))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    lat.sort()
    if not lat:
        print("nan nan nan 0", errors[0])
        return
    q = lambda f: lat[min(len(lat) - 1, int(f * len(lat)))] * 1000
    print(f"{q(0.5):.2f} {q(0.99):.2f} {lat[-1] * 1000:.2f} {len(lat)} {errors[0]}")


def forever(n, f):
    """Runs f() again and again in n threads, until the process is killed."""
    def loop(i):
        while True:
            try:
                f(i)
            except Exception:
                time.sleep(0.5)
    ts = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(int(n))]
    for t in ts:
        t.start()
    while True:
        time.sleep(3600)


def drip_put(url, token, n):
    host, port = url.split("//")[1].split(":")

    def one(_):
        s = socket.create_connection((host, int(port)))
        name = nix32(hashlib.sha256(os.urandom(8)).digest()) + ".nar"
        s.sendall(f"PUT /nar/{name} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                  f"Content-Length: 100000\r\n\r\n".encode())
        with s:
            while True:
                s.sendall(b"x")
                time.sleep(5)
    forever(n, one)


def slow_read(url, path, n):
    host, port = url.split("//")[1].split(":")

    def one(_):
        with socket.create_connection((host, int(port))) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            while s.recv(4096):
                time.sleep(1)
    forever(n, one)


def drip_get(url, n):
    host, port = url.split("//")[1].split(":")

    def one(i):
        c = http.client.HTTPConnection(host, int(port), timeout=30)
        c.request("GET", "/d%031d.narinfo" % random.randrange(10 ** 30))
        c.getresponse().read()
    forever(n, one)


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {"upstream": upstream, "nars": nars, "upload": upload, "probe": probe,
     "drip-put": drip_put, "slow-read": slow_read, "drip-get": drip_get}[cmd](*args)
