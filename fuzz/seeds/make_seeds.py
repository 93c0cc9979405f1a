#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets (protobuf encoded by hand).

grpc_service inputs: [RPC index][framing][message]; `fz-????????????????`
is replaced by a registered executor's id at run time.
labels inputs: fields separated by 0xFF: k, v, k, v, ..., label, target, op.
Run from fuzz/: python3 seeds/make_seeds.py
"""
import os

def varint(n):
    out = b""
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])

def ld(field, payload):
    if isinstance(payload, str):
        payload = payload.encode()
    return varint(field << 3 | 2) + varint(len(payload)) + payload

def vi(field, n):
    return varint(field << 3) + varint(n)

ID = "fz-????????????????"
labels = ld(3, ld(1, "zone") + ld(2, "a")) + ld(3, ld(1, "pool") + ld(2, "p1"))
hb = ld(1, ID) + vi(2, 3000)
sel = lambda label, target, op: ld(2, ld(1, label) + ld(2, target) + vi(3, op))
seeds = {
    "register": (0, ld(1, "worker") + ld(2, "127.0.0.1:9000") + labels),
    "register_bad_label": (0, ld(1, "w") + ld(2, "a:1") + ld(3, ld(1, "-bad") + ld(2, "x"))),
    "heartbeat": (1, hb),
    "heartbeat_unknown": (1, ld(1, "nobody-0000000000000000") + vi(2, 50)),
    "stream": (2, hb + hb),
    "batch": (3, ld(1, hb) + ld(1, hb) + ld(1, ld(1, "x"))),
    "deregister": (4, ld(1, ID)),
    "get": (5, ld(1, ID)),
    "list": (6, vi(1, 2) + sel("zone", "a", 1) + sel("pool", "p.*", 3)),
    "list_bad_regex": (6, sel("zone", "(", 3)),
    "count": (7, vi(1, 1)),
    "watch": (8, b""),
}
os.makedirs("seeds/grpc_service", exist_ok=True)
for name, (rpc, msg) in seeds.items():
    with open(f"seeds/grpc_service/{name}", "wb") as f:
        f.write(bytes([rpc, 0]) + msg)
    if rpc == 2:
        with open(f"seeds/grpc_service/{name}_two_frames", "wb") as f:
            f.write(bytes([rpc, 1]) + msg)

S = b"\xff"
label_seeds = {
    "valid": S.join([b"zone", b"a", b"pool", b"p-1.x", b"zone", b"a", b"\x01"]),
    "regex": S.join([b"zone", b"eu-west-1", b"zone", b"eu-.*", b"\x03"]),
    "neq": S.join([b"k", b"v", b"other", b"v", b"\x02"]),
    "dup": S.join([b"k", b"v", b"k", b"w", b"k", b"v", b"\x01"]),
}
os.makedirs("seeds/labels", exist_ok=True)
for name, data in label_seeds.items():
    with open(f"seeds/labels/{name}", "wb") as f:
        f.write(data)
