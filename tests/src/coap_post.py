"""POSTs a payload to a CoAP URI with aiocoap, as a device built on it would:
aiocoap splits a payload over 1024 bytes into Block1 blocks itself (RFC 7959).

    coap_post.py URI PAYLOAD_FILE [CONTENT_FORMAT]

Prints one JSON line with the final response: code, Size1, Block1 (number,
more, size exponent) and the payload as text. Run by tests/tests/gateway.rs
with the stack's Python (dev/stack installs aiocoap into its venv).
"""

import asyncio
import json
import sys

import aiocoap


async def post(uri, payload, content_format):
    context = await aiocoap.Context.create_client_context()
    try:
        request = aiocoap.Message(code=aiocoap.POST, uri=uri, payload=payload)
        request.opt.content_format = content_format
        response = await context.request(request).response
    finally:
        await context.shutdown()
    block1 = response.opt.block1
    return {
        "code": str(response.code).split(" ")[0],
        "size1": response.opt.size1,
        "block1": None
        if block1 is None
        else [block1.block_number, bool(block1.more), block1.size_exponent],
        "payload": response.payload.decode("utf-8", "replace"),
    }


def main():
    uri, path = sys.argv[1], sys.argv[2]
    content_format = int(sys.argv[3]) if len(sys.argv) > 3 else 50
    with open(path, "rb") as file:
        payload = file.read()
    print(json.dumps(asyncio.run(post(uri, payload, content_format))))


if __name__ == "__main__":
    main()
