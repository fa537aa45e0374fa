#!/usr/bin/env python3
"""Kernel TLS on the wire (run by tests/vm/kernel-tls-wire.sh, in the VM).

Starts imgsvc-server with tls.kernel_tls = "on", then for every suite the
server offers (TLS 1.3 and TLS 1.2) connects an independent client (Python's
`ssl`, i.e. OpenSSL, limited to that one suite) through a TCP relay that
records the server's bytes, and checks:

  nonce:   every TLS 1.2 AES-GCM record's explicit nonce on a connection is
           unique, the server's encrypted Finished (sealed by rustls)
           included, and the kernel's records count up from just past it
           (ChaCha20 and TLS 1.3 records carry none: their nonce is
           iv XOR seq);
  decrypt: OpenSSL decrypts every answer, and each is the exact rotation
           of the image sent (a 90-degree rotation computed here);
  layer:   the server's metric says which record layer served each suite
           (the kernel, for every suite), so the check covers what the
           kernel sealed.

Exits 1 on the first failed check. No third-party modules.

  kernel_tls_wire.py SERVER_BIN GEN_CERTS_BIN WORKDIR
"""
import os
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import urllib.request

SUITES = [
    # (name shown, TLS version, OpenSSL's name, record layer expected)
    ("TLS13_AES_128_GCM_SHA256", "TLSv1.3", "TLS_AES_128_GCM_SHA256", "kernel"),
    ("TLS13_AES_256_GCM_SHA384", "TLSv1.3", "TLS_AES_256_GCM_SHA384", "kernel"),
    ("TLS13_CHACHA20_POLY1305_SHA256", "TLSv1.3", "TLS_CHACHA20_POLY1305_SHA256", "kernel"),
    ("TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256", "TLSv1.2", "ECDHE-ECDSA-AES128-GCM-SHA256", "kernel"),
    ("TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384", "TLSv1.2", "ECDHE-ECDSA-AES256-GCM-SHA384", "kernel"),
    ("TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256", "TLSv1.2", "ECDHE-ECDSA-CHACHA20-POLY1305", "kernel"),
]
# WIRE_HOST=1: a trial run on a kernel without kernel TLS (every suite in rustls).
HOST = os.environ.get("WIRE_HOST") == "1"
CALLS = 6  # per connection, one after another
W, H = 160, 100  # RGB: 48000 bytes each way, three or four records per answer


def fail(msg):
    print(f"FAIL: {msg}", flush=True)
    sys.exit(1)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- HTTP/2 and gRPC, just enough for unary calls -------------------------

def frame(ftype, flags, stream, payload):
    return struct.pack(">I", len(payload))[1:] + bytes([ftype, flags]) + struct.pack(">I", stream) + payload


def hpack_literal(name, value):
    # Literal header field without indexing, new name, no Huffman.
    def s(b):
        assert len(b) < 127
        return bytes([len(b)]) + b
    return b"\x00" + s(name.encode()) + s(value.encode())


def varint(n):
    out = b""
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])


def image_proto(width, height, data):
    return b"\x08\x01" + b"\x12" + varint(len(data)) + data + b"\x18" + varint(width) + b"\x20" + varint(height)


def parse_image(buf):
    fields, i = {}, 0
    while i < len(buf):
        key, i = read_varint(buf, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            fields[num], i = read_varint(buf, i)
        elif wire == 2:
            n, i = read_varint(buf, i)
            fields[num], i = buf[i:i + n], i + n
        else:
            fail(f"unexpected protobuf wire type {wire}")
    return fields.get(3, 0), fields.get(4, 0), fields.get(2, b"")


def read_varint(buf, i):
    n = shift = 0
    while True:
        b = buf[i]
        i += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return n, i


def rotate90(width, height, data):
    """Counter-clockwise quarter turn of RGB pixels (imgsvc's NINETY_DEG)."""
    out = bytearray(len(data))
    # The output is `height` wide and `width` high: out(x', y') = in(width-1-y', x').
    for yo in range(width):
        xs = width - 1 - yo
        for xo in range(height):
            src = (xo * width + xs) * 3
            dst = (yo * height + xo) * 3
            out[dst:dst + 3] = data[src:src + 3]
    return bytes(out)


class H2:
    def __init__(self, tls):
        self.tls, self.buf = tls, b""
        tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0, b""))

    def read_frame(self):
        while len(self.buf) < 9 or len(self.buf) < 9 + int.from_bytes(self.buf[:3], "big"):
            chunk = self.tls.recv(65536)
            if not chunk:
                fail("the server closed the connection mid-call")
            self.buf += chunk
        n = int.from_bytes(self.buf[:3], "big")
        f = (self.buf[3], self.buf[4], int.from_bytes(self.buf[5:9], "big") & 0x7FFFFFFF, self.buf[9:9 + n])
        self.buf = self.buf[9 + n:]
        return f

    def call(self, stream, path, message):
        headers = b"".join(hpack_literal(k, v) for k, v in [
            (":method", "POST"), (":scheme", "https"), (":path", path), (":authority", "localhost"),
            ("content-type", "application/grpc"), ("te", "trailers")])
        body = b"\x00" + struct.pack(">I", len(message)) + message
        self.tls.sendall(frame(1, 4, stream, headers) + frame(0, 1, stream, body))
        data = b""
        for _ in range(10_000):
            ftype, flags, sid, payload = self.read_frame()
            if ftype == 4 and not flags & 1:
                self.tls.sendall(frame(4, 1, 0, b""))  # SETTINGS ACK
            elif ftype == 6 and not flags & 1:
                self.tls.sendall(frame(6, 1, 0, payload))  # PING ACK
            elif ftype == 7:
                fail(f"GOAWAY from the server: {payload!r}")
            elif ftype == 3 and sid == stream:
                fail(f"RST_STREAM on stream {stream}: {payload!r}")
            elif sid == stream and ftype == 0:
                data += payload
                if payload:  # keep the windows open
                    inc = struct.pack(">I", len(payload))
                    self.tls.sendall(frame(8, 0, 0, inc) + frame(8, 0, stream, inc))
            if sid == stream and ftype in (0, 1) and flags & 1:
                break
        else:
            fail("no end of stream after 10000 frames")
        if len(data) < 5:
            fail(f"stream {stream}: no gRPC message (an error status?)")
        n = struct.unpack(">I", data[1:5])[0]
        return data[5:5 + n]


# ---- the relay ------------------------------------------------------------

class Relay:
    """Forwards one client connection to the server and keeps every byte
    the server sent on it."""

    def __init__(self, server_port):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.server_port = server_port
        self.from_server = bytearray()
        self.done = threading.Event()
        threading.Thread(target=self.run, daemon=True).start()

    def run(self):
        client, _ = self.listener.accept()
        server = socket.create_connection(("127.0.0.1", self.server_port))

        def pump(src, dst, keep):
            try:
                while True:
                    b = src.recv(65536)
                    if not b:
                        break
                    if keep is not None:
                        keep += b
                    dst.sendall(b)
            except OSError:
                pass
            finally:
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass

        up = threading.Thread(target=pump, args=(client, server, None), daemon=True)
        up.start()
        pump(server, client, self.from_server)
        up.join(30)
        self.done.set()


def records(stream):
    """(content type, fragment) of each TLS record in `stream`."""
    out, i = [], 0
    while i + 5 <= len(stream):
        ctype, length = stream[i], int.from_bytes(stream[i + 3:i + 5], "big")
        out.append((ctype, bytes(stream[i + 5:i + 5 + length])))
        i += 5 + length
    return out


# ---- the checks -----------------------------------------------------------

def metric(admin_port, layer):
    text = urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=30).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("imgsvc_tls_connections_total{") and f'record_layer="{layer}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def one_suite(name, version, openssl_name, layer, port, admin_port, certs):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(os.path.join(certs, "ca.pem"))
    ctx.load_cert_chain(os.path.join(certs, "client-wire.pem"), os.path.join(certs, "client-wire-key.pem"))
    ctx.set_alpn_protocols(["h2"])
    v = ssl.TLSVersion.TLSv1_3 if version == "TLSv1.3" else ssl.TLSVersion.TLSv1_2
    ctx.minimum_version = ctx.maximum_version = v
    if version == "TLSv1.2":
        ctx.set_ciphers(openssl_name)
    # TLS 1.3 suites: OPENSSL_CONF (set by the caller for this process).
    before = metric(admin_port, layer)
    relay = Relay(port)
    raw = socket.create_connection(("127.0.0.1", relay.port))
    tls = ctx.wrap_socket(raw, server_hostname="localhost")
    got = tls.cipher()[0]
    if got != openssl_name or tls.version() != version:
        fail(f"{name}: negotiated {tls.version()} {got}")
    h2 = H2(tls)
    for call in range(CALLS):
        data = bytes((i * 2654435761 + call * 97) >> 11 & 0xFF for i in range(W * H * 3))
        req = b"\x08\x01" + b"\x12" + varint(len(image_proto(W, H, data))) + image_proto(W, H, data)
        answer = h2.call(2 * call + 1, "/NLImageService/RotateImage", req)
        w, h, pixels = parse_image(answer)
        if (w, h) != (H, W) or pixels != rotate90(W, H, data):
            fail(f"{name}: call {call}: answer {w}x{h} is not the rotation")
    try:
        tls.unwrap()  # close_notify both ways
    except (OSError, ssl.SSLError):
        pass
    tls.close()
    if not relay.done.wait(60):
        fail(f"{name}: the relay saw no end of the connection")
    served = metric(admin_port, layer) - before
    if served != 1:
        fail(f"{name}: {served} connections on the {layer} record layer, 1 expected")
    # The nonces.
    recs = records(relay.from_server)
    after_ccs = False
    nonces = []
    for ctype, frag in recs:
        if ctype == 20:
            after_ccs = True
            continue
        if after_ccs and version == "TLSv1.2" and "GCM" in name:
            nonces.append(frag[:8])
    line = f"{name}: {version} {got}, record layer {layer}, {CALLS} rotations of {W}x{H} decrypted by OpenSSL and exact"
    if version == "TLSv1.2" and "GCM" in name:
        if len(nonces) < CALLS + 1:
            fail(f"{name}: only {len(nonces)} encrypted records")
        if len(set(nonces)) != len(nonces):
            dup = [n.hex() for n in nonces if nonces.count(n) > 1]
            fail(f"{name}: explicit nonce repeated: {dup}")
        if layer == "kernel":
            # The kernel's records: one counter, from just past the block
            # of rustls's nonces (the Finished's, e XOR 0 = e: e + 1 on).
            kernel = [int.from_bytes(n, "big") for n in nonces[1:]]
            first = int.from_bytes(nonces[0], "big") + 1
            if kernel != [(first + i) % (1 << 64) for i in range(len(kernel))]:
                fail(f"{name}: the kernel's explicit nonces {[hex(k) for k in kernel[:4]]}... do not count up from {first:#x}")
        line += f"; {len(nonces)} encrypted records (Finished included), {len(set(nonces))} distinct explicit nonces, first {nonces[0].hex()} {nonces[1].hex()} {nonces[2].hex()}"
    elif version == "TLSv1.2":
        line += f"; {sum(1 for t, _ in recs if t == 23)} application records (ChaCha20: no explicit nonce, iv XOR seq on both sides)"
    else:
        line += f"; {sum(1 for t, _ in recs if t == 23)} encrypted records (TLS 1.3: iv XOR seq on both sides)"
    print("ok  " + line, flush=True)


def main():
    if len(sys.argv) == 8 and sys.argv[1] == "--suite":
        one_suite(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], int(sys.argv[6]), int(sys.argv[7]), os.environ["WIRE_CERTS"])
        return
    server_bin, gen_certs, work = sys.argv[1:4]
    certs = os.path.join(work, "certs")
    subprocess.run([gen_certs, "--out", certs, "--trust-domain", "wire.test", "--tenant", "wire"], check=True, capture_output=True)
    port, admin_port = free_port(), free_port()
    config = os.path.join(work, "imgsvc.toml")
    with open(config, "w") as f:
        f.write(f"""[server]
host = "127.0.0.1"
port = {port}
worker_threads = 2
[admin]
listen = "127.0.0.1:{admin_port}"
[tls]
cert = "{certs}/server.pem"
key = "{certs}/server-key.pem"
client_ca = "{certs}/ca.pem"
trust_domain = "wire.test"
kernel_tls = "{'auto' if HOST else 'on'}"
[log]
level = "info"
format = "pretty"
[tenants.wire]
""")
    log = open(os.path.join(work, "server.log"), "w")
    server = subprocess.Popen([server_bin, "--config", config], stdout=log, stderr=subprocess.STDOUT,
                              env=dict(os.environ, NO_COLOR="1"))
    try:
        for _ in range(600):  # up to 60 s under emulation
            if server.poll() is not None:
                fail(f"the server exited ({server.returncode}): {open(os.path.join(work, 'server.log')).read()}")
            try:
                socket.create_connection(("127.0.0.1", admin_port), timeout=1).close()
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        else:
            fail("the server did not listen within 60 s")
        start = [l for l in open(os.path.join(work, "server.log")) if "kernel_tls=" in l]
        print("start line: " + (start[0].strip() if start else "(none)"), flush=True)
        for name, version, openssl_name, layer in SUITES:
            conf = os.path.join(work, f"openssl-{name}.cnf")
            with open(conf, "w") as f:
                f.write("openssl_conf = o\n[o]\nssl_conf = s\n[s]\nsystem_default = d\n[d]\n"
                        f"Ciphersuites = {openssl_name if version == 'TLSv1.3' else 'TLS_AES_128_GCM_SHA256'}\n")
            r = subprocess.run([sys.executable, __file__, "--suite", name, version, openssl_name, "rustls" if HOST else layer, str(port), str(admin_port)],
                               env=dict(os.environ, OPENSSL_CONF=conf, WIRE_CERTS=certs), timeout=300)
            if r.returncode != 0:
                fail(f"{name}: the client failed")
    finally:
        server.terminate()
        server.wait(60)
    print("wire check: all suites ok", flush=True)


if __name__ == "__main__":
    main()
