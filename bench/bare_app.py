"""Baseline for bench/run.py: the cheapest possible POST /asap on the same stack.

A bare Starlette app that reads the request body (as any real server must) and
returns a fixed JSON-RPC reply shaped and sized like the reference echo agent's
answer to bench/post.lua (~600 bytes). No parsing, validation, ids or logging:
whatever ours costs above this is the price of the protocol implementation.

Served exactly like ours:
    python -m uvicorn bare_app:app --app-dir bench --host 127.0.0.1 --port P \
        --log-level warning --no-access-log
"""

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

REPLY = (
    b'{"jsonrpc":"2.0","result":{"envelope":{"id":"01M8H4B09GGCGRWVXYME82B2NS",'
    b'"asap_version":"0.1","timestamp":"2026-11-28T13:08:30.128596Z",'
    b'"sender":"urn:asap:agent:echo-agent","recipient":"urn:asap:agent:bench",'
    b'"payload_type":"task.response","payload":{"task_id":"task_01M8H4B09GGCGRWVXYME82B2NR",'
    b'"status":"completed","result":{"echoed":{"message":"hello"}},"final_state":null,'
    b'"metrics":null},"correlation_id":"01M8H4B09GGCGRWVXYME82B2NQ",'
    b'"trace_id":"2aafb16ff3819234814d72b5a84cec05","requires_ack":false,'
    b'"extensions":{"trace_id":"2aafb16ff3819234814d72b5a84cec05",'
    b'"span_id":"2bfd93652d683530"}}},"id":"b-1"}'
)


async def asap(request: Request) -> Response:
    await request.body()
    return Response(REPLY, media_type="application/json")


app = Starlette(routes=[Route("/asap", asap, methods=["POST"])])
