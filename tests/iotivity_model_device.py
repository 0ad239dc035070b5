#!/usr/bin/env python3
"""A model of a real IoTivity-Lite cloud device (spec Appendix A, issue 13).

It behaves like the device does, not like the gateway would like it to:

* TLS 1.2 only, ECDHE-ECDSA-AES128-GCM-SHA256, no SNI, no ALPN, a client
  certificate, the gateway checked against the CA.
* RFC 8323 framing written here (no CoAP library). No CSM before its first
  request; every request carries Content-Format 10000, Accept 10000 and
  options 2049 and 2053 = 0x0800; its answers carry Content-Format 10000 and
  option 2053 = 0x0800. Its CBOR uses indefinite-length maps and arrays, as
  IoTivity-Lite's encoder (tinycbor, CborIndefiniteLength) does.
* How it reads (the mbedTLS bug, Appendix A item 6): the TLS record layer is
  parsed here and the TLS engine (ssl.SSLObject on a MemoryBIO) is fed one
  whole record at a time. Each record that arrives lets the device handle
  ONE CoAP message, the oldest it has: what follows that message in the same
  record waits inside the TLS layer (the "stash") and comes out, one message
  per record, only when more records arrive. A device sent two messages in
  one record therefore stays one message behind until a record brings
  nothing new (as seen: Pongs one Ping late, one twin resource per Ping).
  An event loop is not instant: after the socket becomes readable the
  device waits ~5 ms, then reads everything there is.
* Close (item 7): when a TLS close_notify or the FIN comes in the same read
  as application data, the inbound messages of that read are dropped
  ("dropping inbound-coap-message for removed endpoint") and the connection
  is closed.
* Sign-up once (code → accesstoken, refreshtoken, uid, expiresin, all four
  required), sign-in, publish. On EVERY reconnect it first refreshes (POST
  /oic/sec/tokenrefresh) with its stored refresh token and gives that 2 s;
  then signs in with the new access token and publishes again. While
  connected it refreshes at 2/3 of `expiresin` and signs in again on the
  same connection.
* It serves /oic/res (not batch observable), /oic/d, /oic/p and N
  observable lights /light/1..N ({"state": bool, "power": int}, POST
  updates them and notifies observers); anything else answers 4.04.
* Keepalive (item 9): it pings the gateway every --ping-interval seconds
  after sign-in and restarts the connection when the Pong has not been
  handled within --pong-timeout ("keepalive failed ... restarting"). It
  answers the gateway's Pings.
* It reconnects by itself after a close (backoff --backoff, at most
  --max-attempts attempts in a row that do not end signed in), keeping its
  credentials in memory.

Commands on stdin, one per line:

  connect [HOST:PORT]          connect (and from then on reconnect by itself)
  address HOST:PORT            where the next (re)connection goes
  set HREF JSON                update a light and notify its observers
  drop                         close the connection, no reconnect
  lose-next-refresh-answer     the next refresh answer never "arrives"
  probe sign-in-bad-token      a fresh connection signing in with a bad token
  probe request-before-sign-in a fresh connection sending GET /light/1 first
  quit                         close and exit 0 (stdin EOF too)

Everything that happens is one JSON object per line on stdout, with "event"
and "t" (time.monotonic()). Times in seconds.

usage: iotivity_model_device.py --ca CA --cert PEM --key PEM --di ID --code CODE
       --addr HOST:PORT [--lights N] [--ping-interval S] [--pong-timeout S] ...
"""

import argparse
import json
import os
import random
import select
import selectors
import socket
import ssl
import sys
import time

try:
    import cbor2
except ImportError as e:  # pragma: no cover
    print(f"iotivity_model_device.py: {e}; install cbor2", file=sys.stderr)
    sys.exit(2)

OCF_CBOR = 10000
OCF_VERSION = b"\x08\x00"

# Option numbers.
OBSERVE = 6
URI_PATH = 11
CONTENT_FORMAT = 12
URI_QUERY = 15
ACCEPT = 17
OCF_ACCEPT_VERSION = 2049
OCF_CONTENT_VERSION = 2053


def code(c, d):
    return (c << 5) | d


GET, POST, PUT, DELETE = 1, 2, 3, 4
CREATED, DELETED, VALID, CHANGED, CONTENT = code(2, 1), code(2, 2), code(2, 3), code(2, 4), code(2, 5)
BAD_REQUEST, UNAUTHORIZED, NOT_FOUND, METHOD_NOT_ALLOWED = code(4, 0), code(4, 1), code(4, 4), code(4, 5)
CSM, PING, PONG, RELEASE, ABORT = code(7, 1), code(7, 2), code(7, 3), code(7, 4), code(7, 5)

METHODS = {GET: "GET", POST: "POST", PUT: "PUT", DELETE: "DELETE"}
SIGNALS = {CSM: "csm", PING: "ping", PONG: "pong", RELEASE: "release", ABORT: "abort"}


def code_str(c):
    return f"{c >> 5}.{c & 31:02d}"


def now():
    return time.monotonic()


def report(event, **fields):
    fields = {"event": event, "t": round(now(), 4), **fields}
    sys.stdout.write(json.dumps(fields, default=repr) + "\n")
    sys.stdout.flush()


# --- CBOR as IoTivity-Lite writes it: indefinite-length maps and arrays ---


def ocf_cbor(value):
    if isinstance(value, dict):
        return b"\xbf" + b"".join(ocf_cbor(k) + ocf_cbor(v) for k, v in value.items()) + b"\xff"
    if isinstance(value, (list, tuple)):
        return b"\x9f" + b"".join(ocf_cbor(v) for v in value) + b"\xff"
    return cbor2.dumps(value)


def decode(payload, content_format=OCF_CBOR):
    """A payload by its Content-Format: CBOR (60, 10000), JSON (50), else
    text (the gateway's error diagnostics have no Content-Format)."""
    if not payload:
        return None
    try:
        if content_format in (60, OCF_CBOR):
            return cbor2.loads(payload)
        if content_format == 50:
            return json.loads(payload)
    except Exception:
        pass
    return payload.decode("utf-8", "replace")


# --- RFC 8323 framing ---


def encode_uint(n):
    if n == 0:
        return b""
    return n.to_bytes((n.bit_length() + 7) // 8, "big")


def _nibble(n):
    if n < 13:
        return n, b""
    if n < 269:
        return 13, bytes([n - 13])
    return 14, (n - 269).to_bytes(2, "big")


def encode_message(c, token, options=(), payload=b""):
    """options: (number, bytes) pairs, any order."""
    body = bytearray()
    last = 0
    for number, value in sorted(options, key=lambda o: o[0]):
        dn, dext = _nibble(number - last)
        ln, lext = _nibble(len(value))
        body.append((dn << 4) | ln)
        body += dext + lext + value
        last = number
    if payload:
        body += b"\xff" + payload
    n = len(body)
    if n < 13:
        head, ext = n, b""
    elif n < 269:
        head, ext = 13, bytes([n - 13])
    elif n < 65805:
        head, ext = 14, (n - 269).to_bytes(2, "big")
    else:
        head, ext = 15, (n - 65805).to_bytes(4, "big")
    return bytes([(head << 4) | len(token)]) + ext + bytes([c]) + token + bytes(body)


class Message:
    def __init__(self, c, token, options, payload):
        self.code, self.token, self.options, self.payload = c, token, options, payload

    def opt(self, number):
        return [v for n, v in self.options if n == number]

    def uint(self, number):
        vals = self.opt(number)
        return int.from_bytes(vals[0], "big") if vals else None

    def path(self):
        return "/" + "/".join(v.decode() for v in self.opt(URI_PATH))

    def query(self):
        return [v.decode() for v in self.opt(URI_QUERY)]

    def body(self):
        return decode(self.payload, self.uint(CONTENT_FORMAT))

    def summary(self):
        out = {"code": code_str(self.code), "token": self.token.hex()}
        if self.code in METHODS:
            out["href"] = self.path()
        if self.payload:
            out["payload"] = self.body()
        return out


def parse_message(buf):
    """(Message, consumed) for a whole frame at the front of buf, else None."""
    if not buf:
        return None
    head, tkl = buf[0] >> 4, buf[0] & 15
    pos = 1
    ext = {13: 1, 14: 2, 15: 4}.get(head, 0)
    if len(buf) < pos + ext:
        return None
    if ext:
        n = int.from_bytes(buf[pos:pos + ext], "big") + {13: 13, 14: 269, 15: 65805}[head]
    else:
        n = head
    pos += ext
    end = pos + 1 + tkl + n
    if len(buf) < end:
        return None
    c = buf[pos]
    token = bytes(buf[pos + 1:pos + 1 + tkl])
    rest = bytes(buf[pos + 1 + tkl:end])
    options, number, i = [], 0, 0
    payload = b""
    while i < len(rest):
        if rest[i] == 0xFF:
            payload = rest[i + 1:]
            break
        dn, ln = rest[i] >> 4, rest[i] & 15
        i += 1
        vals = []
        for x in (dn, ln):
            if x == 13:
                vals.append(rest[i] + 13)
                i += 1
            elif x == 14:
                vals.append(int.from_bytes(rest[i:i + 2], "big") + 269)
                i += 2
            else:
                vals.append(x)
        number += vals[0]
        options.append((number, rest[i:i + vals[1]]))
        i += vals[1]
    return Message(c, token, options, payload), end


# --- the device's resources ---


class Resources:
    def __init__(self, di, lights):
        self.di = di
        self.piid = "f0b0b0c2-8e1a-4bd4-9c51-5b2b0a0e0d01"
        self.lights = {f"/light/{i}": {"state": False, "power": 0} for i in range(1, lights + 1)}
        self.ins = {}
        # href -> {token: observe sequence}
        self.observers = {}

    def instance(self, href):
        if href not in self.ins:
            self.ins[href] = random.randrange(1, 2**32)
        return self.ins[href]

    def links(self, local_port, for_rd=False):
        res = [
            ("/oic/res", ["oic.wk.res"], ["oic.if.ll", "oic.if.b", "oic.if.baseline"], 1),
            ("/oic/d", ["oic.d.cloudDevice", "oic.wk.d"], ["oic.if.r", "oic.if.baseline"], 3),
            ("/oic/p", ["oic.wk.p"], ["oic.if.r", "oic.if.baseline"], 3),
        ] + [(h, ["core.light"], ["oic.if.rw", "oic.if.baseline"], 3) for h in self.lights]
        out = []
        for href, rt, iface, bm in res:
            if for_rd:
                # Appendix A item 3: what it publishes (not /oic/res).
                if href == "/oic/res":
                    continue
                out.append({"href": href, "rt": rt, "if": iface, "rel": "hosts",
                            "ins": self.instance(href), "p": {"bm": bm}})
            else:
                out.append({"anchor": f"ocf://{self.di}", "href": href, "rt": rt, "if": iface,
                            "rel": ["hosts"], "p": {"bm": bm},
                            "eps": [{"ep": f"coaps+tcp://127.0.0.1:{local_port}"}]})
        return out

    def representation(self, href, query):
        if href == "/oic/d":
            rep = {"n": "model-light", "di": self.di, "piid": self.piid,
                   "icv": "ocf.2.0.5", "dmv": "ocf.res.1.3.0,ocf.sh.1.3.0"}
            if "if=oic.if.baseline" in query:
                rep = {"rt": ["oic.d.cloudDevice", "oic.wk.d"],
                       "if": ["oic.if.r", "oic.if.baseline"], **rep}
            return rep
        if href == "/oic/p":
            return {"pi": self.piid, "mnmn": "model"}
        if href in self.lights:
            return dict(self.lights[href])
        return None


# --- the TLS connection with the record-by-record read model ---


class Closed(Exception):
    pass


class Conn:
    def __init__(self, args, addr):
        self.args = args
        self.addr = addr
        host, port = addr.rsplit(":", 1)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_ciphers("ECDHE-ECDSA-AES128-GCM-SHA256")
        ctx.check_hostname = False  # no SNI, and its CN is uuid:<hub id>
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(args.ca)
        ctx.load_cert_chain(args.cert, args.key)
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self.incoming, self.outgoing, server_side=False, server_hostname=None)
        self.sock = socket.create_connection((host, int(port)), timeout=3)
        self.sock.setblocking(False)
        self.local_port = self.sock.getsockname()[1]
        self.rx = bytearray()  # ciphertext not yet fed to the TLS engine
        self.plain = bytearray()  # decrypted, not yet a whole CoAP message
        self.waiting = []  # (Message, arrival): decrypted, not yet handled
        self.handshaken = False

    def fileno(self):
        return self.sock.fileno()

    def flush(self):
        data = self.outgoing.read()
        deadline = now() + 3
        while data:
            try:
                n = self.sock.send(data)
                data = data[n:]
            except BlockingIOError:
                if now() > deadline:
                    raise Closed("send stalled")
                select.select([], [self.sock], [], 0.1)
            except OSError as e:
                raise Closed(f"send: {e}")

    def handshake(self, limit=5.0):
        deadline = now() + limit
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                pass
            self.flush()
            # Feed one record at a time, so that application data after the
            # handshake stays in rx for the read model.
            while True:
                rec = self.next_record()
                if rec is not None:
                    self.incoming.write(rec)
                    break
                left = deadline - now()
                if left <= 0:
                    raise Closed("handshake timeout")
                r, _, _ = select.select([self.sock], [], [], left)
                if r:
                    data = self._recv_all()
                    if data is None:
                        raise Closed("EOF during handshake")
        self.flush()
        self.handshaken = True
        return self.tls.version(), self.tls.cipher()[0]

    def _recv_all(self):
        """Everything there is now; None on EOF (with what came before in rx)."""
        got = False
        while True:
            try:
                chunk = self.sock.recv(65536)
            except BlockingIOError:
                return got
            except ConnectionError:
                return None
            if not chunk:
                return None
            self.rx += chunk
            got = True

    def next_record(self):
        if len(self.rx) < 5:
            return None
        n = int.from_bytes(self.rx[3:5], "big")
        if len(self.rx) < 5 + n:
            return None
        rec = bytes(self.rx[:5 + n])
        del self.rx[:5 + n]
        return rec

    def send(self, msg_bytes):
        self.tls.write(msg_bytes)  # one TLS record per CoAP message
        self.flush()

    def _parse(self, arrival):
        while True:
            parsed = parse_message(self.plain)
            if parsed is None:
                return
            msg, used = parsed
            del self.plain[:used]
            self.waiting.append((msg, arrival))

    def readable(self):
        """One readable event: (messages handled now, closed?, dropped)."""
        time.sleep(0.005)
        eof = self._recv_all() is None
        arrival = now()
        handled = []
        app_data = False
        close_notify = False
        while True:
            rec = self.next_record()
            if rec is None:
                break
            self.incoming.write(rec)
            if rec[0] == 23:
                app_data = True
            plain = bytearray()
            while True:
                try:
                    chunk = self.tls.read(65536)
                except ssl.SSLWantReadError:
                    break
                except ssl.SSLZeroReturnError:
                    close_notify = True
                    break
                except ssl.SSLError as e:
                    raise Closed(f"TLS: {e}")
                if not chunk:
                    close_notify = True
                    break
                plain += chunk
            self.plain += plain
            self._parse(arrival)
            if plain and self.waiting:
                # One CoAP message per record, the oldest first: mbedTLS
                # hands out what is left of an earlier record before it
                # decrypts this one, and the device reads one message per
                # record that arrives.
                handled.append(self.waiting.pop(0))
        why = "close_notify" if close_notify else "eof"
        if (eof or close_notify) and app_data:
            # The endpoint is gone before the messages are dispatched.
            return [], True, handled + self._all_stashed(), why
        if eof or close_notify:
            # What still waited in the TLS layer goes with the endpoint.
            return handled, True, self._all_stashed(), why
        return handled, False, [], None

    def _all_stashed(self):
        out, self.waiting = self.waiting, []
        return out

    def close(self):
        try:
            self.tls.unwrap()
        except ssl.SSLError:
            pass
        try:
            self.flush()
        except Closed:
            pass
        try:
            self.sock.close()
        except OSError:
            pass


# --- the device ---


class Device:
    def __init__(self, args):
        self.args = args
        self.res = Resources(args.di, args.lights)
        self.addr = args.addr
        self.conn = None
        self.conn_no = 0
        self.auto = False  # reconnect by itself
        self.account = None  # {uid, accesstoken, refreshtoken, expiresin}
        self.signed_in = False
        self.pending = {}  # token -> (step, deadline, extra)
        self.step = None
        self.timers = {}  # name -> monotonic time
        self.ping_token = None
        self.ping_sent_at = None
        self.failures = 0
        self.lose_refresh = False
        self.probe = None
        self.lost_refresh_token = None
        self.obs_seq = 2
        self.sel = selectors.DefaultSelector()
        self.sel.register(sys.stdin, selectors.EVENT_READ, "stdin")
        os.set_blocking(sys.stdin.fileno(), False)
        self.stdin_buf = b""
        self.quit = False

    # -- connection life --

    def connect(self, probe=None):
        self.timers.pop("reconnect", None)
        self.conn_no += 1
        try:
            conn = Conn(self.args, self.addr)
            version, cipher = conn.handshake()
        except (OSError, Closed, ssl.SSLError) as e:
            report("connect_failed", addr=self.addr, error=str(e), connection=self.conn_no)
            if probe is None:
                self.schedule_reconnect()
            return
        self.conn = conn
        self.signed_in = False
        self.pending.clear()
        self.sel.register(conn.sock, selectors.EVENT_READ, "sock")
        report("connected", addr=self.addr, local_port=conn.local_port, tls=version,
               cipher=cipher, connection=self.conn_no)
        self.probe = probe
        if probe == "sign-in-bad-token":
            uid = self.account["uid"] if self.account else "nobody"
            self.request("sign_in", POST, "/oic/sec/session",
                         {"uid": uid, "di": self.args.di, "accesstoken": "not-a-token", "login": True})
        elif probe == "request-before-sign-in":
            self.request("probe_get", GET, "/light/1", None)
        elif self.account is None:
            self.request("sign_up", POST, "/oic/sec/account",
                         {"di": self.args.di, "authprovider": "plgd",
                          "accesstoken": self.args.code, "devicetype": "device"})
        else:
            self.refresh()
        # Data that came with the end of the handshake (e.g. the CSM).
        if conn.rx:
            self.on_readable()

    def close(self, reason, reconnect=True):
        if self.conn is None:
            return
        try:
            self.sel.unregister(self.conn.sock)
        except (KeyError, ValueError):
            pass
        self.conn.close()
        self.conn = None
        self.signed_in = False
        self.pending.clear()
        self.ping_token = None
        for t in ("ping", "pong", "refresh"):
            self.timers.pop(t, None)
        for obs in self.res.observers.values():
            obs.clear()
        report("closed", reason=reason, connection=self.conn_no)
        was_probe = self.probe is not None
        self.probe = None
        if reconnect and self.auto and not was_probe:
            self.schedule_reconnect()

    def schedule_reconnect(self):
        if not self.auto:
            return
        self.failures += 1
        if self.failures > self.args.max_attempts:
            report("gave_up", attempts=self.failures - 1)
            self.auto = False
            return
        self.timers["reconnect"] = now() + self.args.backoff
        report("reconnect", attempt=self.failures, after=self.args.backoff)

    # -- requests of the device --

    def request(self, step, method, href, body, query=None, timeout=None):
        token = os.urandom(8)
        opts = [(URI_PATH, seg.encode()) for seg in href.strip("/").split("/")]
        if query:
            opts.append((URI_QUERY, query.encode()))
        opts += [(ACCEPT, encode_uint(OCF_CBOR)), (OCF_ACCEPT_VERSION, OCF_VERSION),
                 (OCF_CONTENT_VERSION, OCF_VERSION)]
        payload = b""
        if body is not None:
            payload = ocf_cbor(body)
            opts.append((CONTENT_FORMAT, encode_uint(OCF_CBOR)))
        limit = timeout if timeout is not None else self.args.request_timeout
        self.pending[token] = (step, now() + limit, now())
        report("request_sent", step=step, href=href)
        self.send(encode_message(method, token, opts, payload))

    def send(self, frame):
        if self.conn is None:
            return
        try:
            self.conn.send(frame)
        except (Closed, ssl.SSLError, OSError) as e:
            self.close(f"send failed: {e}")

    def refresh(self):
        a = self.account
        self.request("refresh", POST, "/oic/sec/tokenrefresh",
                     {"di": self.args.di, "uid": a["uid"], "authprovider": "plgd",
                      "granttype": "refresh_token", "refreshtoken": a["refreshtoken"]},
                     timeout=self.args.refresh_timeout)

    def sign_in(self):
        a = self.account
        self.request("sign_in", POST, "/oic/sec/session",
                     {"uid": a["uid"], "di": self.args.di, "accesstoken": a["accesstoken"],
                      "login": True})

    def publish(self):
        self.request("publish", POST, "/oic/rd",
                     {"di": self.args.di, "n": "model-light", "ttl": 0,
                      "links": self.res.links(self.conn.local_port, for_rd=True)},
                     query="rt=oic.wk.rdpub")

    def answered(self, msg, step, sent_at):
        body = msg.body()
        ok = (msg.code >> 5) == 2
        report("answer", step=step, code=code_str(msg.code), rtt=round(now() - sent_at, 4),
               body=body if isinstance(body, (dict, list)) else body, connection=self.conn_no)
        if step in ("probe_get",) or (self.probe is not None):
            # A probe reports what it read, then goes away.
            self.close("probe done", reconnect=False)
            return
        if not ok:
            report("failed", step=step, code=code_str(msg.code), diagnostic=body)
            if step in ("sign_up", "sign_in", "refresh"):
                # IoTivity-Lite closes and retries later.
                self.close(f"{step} failed with {code_str(msg.code)}")
            return
        if step == "sign_up":
            keys = ("accesstoken", "refreshtoken", "uid", "expiresin")
            if not isinstance(body, dict) or any(k not in body for k in keys) or \
                    not isinstance(body.get("expiresin"), int):
                report("failed", step=step, code=code_str(msg.code), diagnostic="missing keys")
                self.close("sign-up answer incomplete")
                return
            self.account = {k: body[k] for k in keys}
            report("signed_up", uid=body["uid"], expiresin=body["expiresin"])
            self.sign_in()
        elif step == "refresh":
            if not isinstance(body, dict) or "accesstoken" not in body or "refreshtoken" not in body:
                report("failed", step=step, code=code_str(msg.code), diagnostic="missing keys")
                self.close("refresh answer incomplete")
                return
            self.account.update(accesstoken=body["accesstoken"], refreshtoken=body["refreshtoken"],
                                expiresin=body.get("expiresin", -1))
            report("refreshed", expiresin=body.get("expiresin"), connection=self.conn_no)
            self.sign_in()
        elif step == "sign_in":
            exp = body.get("expiresin") if isinstance(body, dict) else None
            if not isinstance(exp, int):
                report("failed", step=step, code=code_str(msg.code), diagnostic="no expiresin")
                self.close("sign-in answer without expiresin")
                return
            first = not self.signed_in
            self.signed_in = True
            self.failures = 0
            report("signed_in", expiresin=exp, connection=self.conn_no, first=first)
            if exp > 0:
                self.timers["refresh"] = now() + exp * 2 / 3
            if first:
                self.publish()
                self.timers["ping"] = now() + self.args.ping_interval
        elif step == "publish":
            report("published", links=len(body.get("links", [])) if isinstance(body, dict) else None)

    # -- requests of the gateway --

    def answer(self, req, c, body=None, observe=None):
        opts = [(OCF_CONTENT_VERSION, OCF_VERSION)]
        payload = b""
        if body is not None:
            payload = ocf_cbor(body)
            opts.append((CONTENT_FORMAT, encode_uint(OCF_CBOR)))
        if observe is not None:
            opts.append((OBSERVE, encode_uint(observe)))
        self.send(encode_message(c, req.token, opts, payload))

    def serve(self, req, arrived):
        href, query = req.path(), req.query()
        observe = req.uint(OBSERVE)
        report("request", method=METHODS.get(req.code, code_str(req.code)), href=href,
               query=query, observe=observe, delay=round(now() - arrived, 4))
        if href == "/oic/res":
            if req.code != GET:
                return self.answer(req, METHOD_NOT_ALLOWED)
            links = self.res.links(self.conn.local_port)
            wanted = [q[3:] for q in query if q.startswith("rt=")]
            if wanted:
                links = [l for l in links if any(rt in wanted for rt in l["rt"])]
            if "if=oic.if.baseline" in query:
                body = [{"rt": ["oic.wk.res"], "if": ["oic.if.ll", "oic.if.b", "oic.if.baseline"],
                         "links": links}]
            else:
                body = links
            # Not observable: no Observe option in the answer.
            return self.answer(req, CONTENT, body)
        rep = self.res.representation(href, query)
        if rep is None:
            return self.answer(req, NOT_FOUND)
        if req.code == GET:
            obs = self.res.observers.setdefault(href, {})
            if observe == 0:
                self.obs_seq += 1
                obs[req.token] = self.obs_seq
                return self.answer(req, CONTENT, rep, observe=self.obs_seq)
            if observe == 1:
                obs.pop(req.token, None)
            return self.answer(req, CONTENT, rep)
        if req.code == POST and href in self.res.lights:
            body = req.body()
            report("post", href=href, body=body, content_format=req.uint(CONTENT_FORMAT),
                   query=query, delay=round(now() - arrived, 4))
            if isinstance(body, dict):
                for k in ("state", "power"):
                    if k in body:
                        self.res.lights[href][k] = body[k]
            self.answer(req, CHANGED, dict(self.res.lights[href]))
            self.notify(href)
            return
        return self.answer(req, METHOD_NOT_ALLOWED)

    def notify(self, href):
        rep = self.res.representation(href, [])
        for token in list(self.res.observers.get(href, {})):
            self.obs_seq += 1
            self.res.observers[href][token] = self.obs_seq
            opts = [(OCF_CONTENT_VERSION, OCF_VERSION), (CONTENT_FORMAT, encode_uint(OCF_CBOR)),
                    (OBSERVE, encode_uint(self.obs_seq))]
            self.send(encode_message(CONTENT, token, opts, ocf_cbor(rep)))
            report("notified", href=href, observe=self.obs_seq)

    # -- the read side --

    def on_readable(self):
        conn = self.conn
        try:
            handled, closed, dropped, why = conn.readable()
        except Closed as e:
            self.close(str(e))
            return
        if dropped:
            report("dropped_inbound", reason=why, messages=[m.summary() for m, _ in dropped],
                   note="dropping inbound-coap-message for removed endpoint")
        if conn.waiting:
            report("behind", waiting=[m.summary() for m, _ in conn.waiting])
        for msg, arrived in handled:
            if self.conn is not conn:
                break
            self.handle(msg, arrived)
        if closed and self.conn is conn:
            self.close(f"peer closed ({why})")

    def handle(self, msg, arrived):
        c = msg.code
        if c == PING:
            report("gw_ping", delay=round(now() - arrived, 4))
            self.send(encode_message(PONG, msg.token))
        elif c == PONG:
            if self.ping_token is not None and msg.token == self.ping_token:
                report("pong", rtt=round(now() - self.ping_sent_at, 4))
                self.ping_token = None
                self.timers.pop("pong", None)
                self.timers["ping"] = self.ping_sent_at + self.args.ping_interval
            else:
                report("stray_pong", token=msg.token.hex())
        elif c in SIGNALS:
            report(SIGNALS[c], options=len(msg.options))
        elif c in METHODS:
            self.serve(msg, arrived)
        elif c == 0:
            report("empty")
        else:
            entry = self.pending.pop(msg.token, None)
            if entry is None:
                report("unmatched_answer", **msg.summary())
                return
            step, _deadline, sent_at = entry
            if step == "refresh" and self.lose_refresh:
                self.lose_refresh = False
                # As if it never arrived: the request stays pending and
                # times out.
                self.pending[msg.token] = entry
                report("refresh_answer_lost", **msg.summary())
                self.lost_refresh_token = msg.token
                return
            if self.lost_refresh_token == msg.token:
                return
            self.answered(msg, step, sent_at)

    # -- timers --

    def on_timers(self):
        t = now()
        if "reconnect" in self.timers and t >= self.timers["reconnect"]:
            self.timers.pop("reconnect")
            self.connect()
        if self.conn is None:
            return
        for token, (step, deadline, sent_at) in list(self.pending.items()):
            if t >= deadline:
                self.pending.pop(token, None)
                report(f"{step}_timeout", waited=round(t - sent_at, 4))
                self.close(f"{step} timed out")
                return
        if "pong" in self.timers and t >= self.timers["pong"]:
            report("pong_late", waited=round(t - self.ping_sent_at, 4))
            report("keepalive_failed", note="keepalive failed, restarting")
            self.close("keepalive failed")
            return
        if "ping" in self.timers and t >= self.timers["ping"] and self.signed_in:
            self.timers.pop("ping")
            self.ping_token = os.urandom(8)
            self.ping_sent_at = t
            self.timers["pong"] = t + self.args.pong_timeout
            self.send(encode_message(PING, self.ping_token))
        if "refresh" in self.timers and t >= self.timers["refresh"] and self.conn is not None:
            self.timers.pop("refresh")
            self.refresh()

    # -- commands --

    def command(self, line):
        words = line.split(None, 2)
        if not words:
            return
        cmd = words[0]
        if cmd == "connect":
            if len(words) > 1:
                self.addr = words[1]
            self.auto = True
            self.failures = 0
            if self.conn is None:
                self.connect()
        elif cmd == "address":
            self.addr = words[1]
            report("address", addr=self.addr)
        elif cmd == "set":
            href, body = words[1], json.loads(words[2])
            self.res.lights[href].update(body)
            report("set", href=href, value=self.res.lights[href])
            self.notify(href)
        elif cmd == "drop":
            self.auto = False
            self.timers.pop("reconnect", None)
            self.close("dropped", reconnect=False)
            report("dropped")
        elif cmd == "lose-next-refresh-answer":
            self.lose_refresh = True
            report("will_lose_refresh_answer")
        elif cmd == "refresh-now":
            if self.conn is not None:
                self.refresh()
        elif cmd == "probe":
            self.auto = False
            self.timers.pop("reconnect", None)
            self.close("probe", reconnect=False)
            self.connect(probe=words[1])
        elif cmd == "mark":
            report("mark")
        elif cmd == "quit":
            self.quit = True
        else:
            report("error", error=f"unknown command {line!r}")

    def on_stdin(self):
        try:
            chunk = os.read(sys.stdin.fileno(), 65536)
        except BlockingIOError:
            return
        if not chunk:
            self.quit = True
            return
        self.stdin_buf += chunk
        while b"\n" in self.stdin_buf:
            line, self.stdin_buf = self.stdin_buf.split(b"\n", 1)
            self.command(line.decode().strip())

    def run(self):
        report("started", pid=os.getpid())
        deadline = now() + self.args.lifetime
        while not self.quit and now() < deadline:
            waits = [t for t in self.timers.values()] + [d for _, d, _ in self.pending.values()]
            timeout = max(0.0, min([0.2] + [w - now() for w in waits]))
            for key, _ in self.sel.select(timeout):
                if key.data == "stdin":
                    self.on_stdin()
                elif key.data == "sock" and self.conn is not None and key.fileobj is self.conn.sock:
                    self.on_readable()
            self.on_timers()
        self.auto = False
        self.close("quit", reconnect=False)
        report("quit")


def main():
    p = argparse.ArgumentParser(description="a model of an IoTivity-Lite cloud device")
    p.add_argument("--ca", required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--di", required=True)
    p.add_argument("--code", required=True)
    p.add_argument("--addr", required=True)
    p.add_argument("--lights", type=int, default=3)
    p.add_argument("--ping-interval", type=float, default=20.0)
    p.add_argument("--pong-timeout", type=float, default=4.0)
    p.add_argument("--refresh-timeout", type=float, default=2.0)
    p.add_argument("--request-timeout", type=float, default=5.0)
    p.add_argument("--backoff", type=float, default=0.5)
    p.add_argument("--max-attempts", type=int, default=40)
    p.add_argument("--lifetime", type=float, default=300.0, help="exit after this long")
    args = p.parse_args()
    try:
        Device(args).run()
    except Exception as e:  # report, then fail
        import traceback
        report("error", error=f"{type(e).__name__}: {e}", trace=traceback.format_exc())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
