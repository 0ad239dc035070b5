#!/usr/bin/env python3
"""An OCF device played by aiocoap that keeps a twin: driven step by step.

Run by tests/interop_aiocoap_twin.rs with the interpreter of the virtualenv
that scripts/test sets up (aiocoap + cbor2). The device serves, on the
coaps+tcp connection it opened, an observable /light ({"state": bool}),
/oic/d, and /oic/res (link list; not batch observable, so the gateway
observes /light by itself, spec §6.6).

Protocol with the test: one JSON object per line on stdout for each thing
that happened ({"event": ...}); commands one per line on stdin:

  connect   connect, sign up (first time) or sign in again, publish /light
  set BOOL  change /light's state and notify its observers
  drop      close the connection (the device goes offline)
  quit      close and exit 0

Each POST the gateway sends to /light is applied and reported as
{"event": "post", "body": ...}. Errors are reported as {"event": "error"}
and the script exits 1.

usage: aiocoap_twin_device.py HOST:PORT CA_PEM DEVICE_PEM DEVICE_KEY_PEM DEVICE_ID SIGNUP_CODE
"""

import asyncio
import json
import ssl
import sys

try:
    import aiocoap
    import aiocoap.resource
    import cbor2
except ImportError as e:
    print(f"aiocoap_twin_device.py: {e}; install aiocoap and cbor2", file=sys.stderr)
    sys.exit(2)

OCF_CBOR = 10000
REQUEST_TIMEOUT = 10.0


def report(**event):
    print(json.dumps(event, default=repr), flush=True)


class Light(aiocoap.resource.ObservableResource):
    def __init__(self):
        super().__init__()
        self.value = {"state": False}

    def set(self, state):
        self.value = {"state": state}
        self.updated_state()

    async def render_get(self, request):
        return aiocoap.Message(
            code=aiocoap.CONTENT, payload=cbor2.dumps(self.value), content_format=OCF_CBOR
        )

    async def render_post(self, request):
        try:
            body = cbor2.loads(request.payload)
        except Exception as e:
            return aiocoap.Message(code=aiocoap.BAD_REQUEST, payload=str(e).encode())
        report(
            event="post",
            body=body,
            content_format=request.opt.content_format,
            query=list(request.opt.uri_query),
        )
        if isinstance(body, dict):
            self.value.update(body)
        self.updated_state()
        return aiocoap.Message(
            code=aiocoap.CHANGED, payload=cbor2.dumps(self.value), content_format=OCF_CBOR
        )


class Device(aiocoap.resource.Resource):
    async def render_get(self, request):
        return aiocoap.Message(
            code=aiocoap.CONTENT,
            payload=cbor2.dumps({"di": DEVICE_ID, "n": "aiocoap light"}),
            content_format=OCF_CBOR,
        )


class OicRes(aiocoap.resource.Resource):
    async def render_get(self, request):
        query = list(request.opt.uri_query)
        anchor = f"ocf://{DEVICE_ID}"
        links = [
            {"href": "/oic/d", "rt": ["oic.wk.d"], "if": ["oic.if.r", "oic.if.baseline"],
             "p": {"bm": 1}, "anchor": anchor, "eps": [{"ep": "coaps+tcp://127.0.0.1:5683"}]},
            {"href": "/oic/res", "rt": ["oic.wk.res"], "if": ["oic.if.ll", "oic.if.baseline"],
             "p": {"bm": 1}, "anchor": anchor},
            LIGHT_LINK | {"anchor": anchor},
        ]
        wanted = [q[3:] for q in query if q.startswith("rt=")]
        if wanted:
            links = [l for l in links if any(rt in wanted for rt in l["rt"])]
        return aiocoap.Message(
            code=aiocoap.CONTENT, payload=cbor2.dumps(links), content_format=OCF_CBOR
        )


LIGHT_LINK = {"href": "/light", "rt": ["core.light"], "if": ["oic.if.rw", "oic.if.baseline"],
              "p": {"bm": 3}}
DEVICE_ID = ""


class Client:
    def __init__(self, hostport, ca, cert, key, code):
        self.base = f"coaps+tcp://{hostport}"
        self.ca, self.cert, self.key, self.code = ca, cert, key, code
        self.ctx = None
        self.light = Light()
        self.account = None

    async def request(self, step, code, path, body=None, query=None):
        uri = self.base + path + (f"?{query}" if query else "")
        msg = aiocoap.Message(code=code, uri=uri)
        if body is not None:
            msg.payload = cbor2.dumps(body)
            msg.opt.content_format = OCF_CBOR
        resp = await asyncio.wait_for(self.ctx.request(msg).response, REQUEST_TIMEOUT)
        if not resp.code.is_successful():
            raise RuntimeError(f"{step}: {resp.code} {resp.payload.decode('utf-8', 'replace')!r}")
        return cbor2.loads(resp.payload) if resp.payload else None

    async def connect(self):
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca)
        context.load_cert_chain(self.cert, self.key)
        self.ctx = await aiocoap.Context.create_client_context(transports=["tlsclient"])
        self.ctx.client_credentials.ssl_client_context = lambda scheme, hostinfo: context
        site = aiocoap.resource.Site()
        site.add_resource(["oic", "res"], OicRes())
        site.add_resource(["oic", "d"], Device())
        site.add_resource(["light"], self.light)
        self.ctx.serversite = site
        if self.account is None:
            self.account = await self.request(
                "sign_up", aiocoap.POST, "/oic/sec/account",
                {"di": DEVICE_ID, "authprovider": "plgd", "accesstoken": self.code,
                 "devicetype": "device"})
            report(event="signed_up", uid=self.account["uid"])
        await self.request(
            "sign_in", aiocoap.POST, "/oic/sec/session",
            {"di": DEVICE_ID, "uid": self.account["uid"],
             "accesstoken": self.account["accesstoken"], "login": True})
        await self.request(
            "publish", aiocoap.POST, "/oic/rd",
            {"di": DEVICE_ID, "ttl": 0, "links": [LIGHT_LINK]}, query="rt=oic.wk.rdpub")
        report(event="connected")

    async def drop(self):
        if self.ctx is not None:
            # aiocoap's shutdown only sends Release (RFC 8323 §5.5) and
            # waits for the server to close, but the gateway ignores a
            # device's Release (spec §2.3, checklist item 3): close the TLS
            # connections ourselves, as a device that goes away does.
            for interface in self.ctx.request_interfaces:
                pool = getattr(getattr(interface, "token_interface", None), "_pool", {})
                for connection in list(pool.values()):
                    transport = getattr(connection, "_transport", None)
                    if transport is not None:
                        transport.close()
            await self.ctx.shutdown()
            self.ctx = None
        report(event="dropped")


async def main(argv):
    global DEVICE_ID
    if len(argv) != 7:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    hostport, ca, cert, key, DEVICE_ID, code = argv[1:]
    client = Client(hostport, ca, cert, key, code)
    loop = asyncio.get_running_loop()
    try:
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                break
            words = line.split()
            if not words:
                continue
            if words[0] == "connect":
                await client.connect()
            elif words[0] == "set":
                client.light.set(words[1] == "true")
                report(event="set", state=client.light.value["state"])
            elif words[0] == "drop":
                await client.drop()
            elif words[0] == "quit":
                break
            else:
                raise RuntimeError(f"unknown command {line!r}")
    except Exception as e:
        report(event="error", error=f"{type(e).__name__}: {e}")
        return 1
    finally:
        await client.drop()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv)))
