"""The floor of `timerd bench --shape create`: the least a Starlette create endpoint can cost.

    python -m timerd.bench_floor PORT

Serves `POST /timers` on 127.0.0.1:PORT under the same uvicorn settings as `timerd api` (uvloop,
httptools, no access log, no server header): it parses the JSON body, refuses anything that is
not an object, and answers 201 with a new timer id. No validation, no store, no metrics: what the
framework and the server cost on their own, so `timerd api`'s create rate can be read as a
ratio of it. `GET /healthz` says when it is up.
"""

from __future__ import annotations

import json
import sys

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from timerd.models import new_timer_id


async def create(request: Request) -> JSONResponse:
    """Parse the body as `timerd api` must, answer a new id."""
    body = json.loads(await request.body())
    if not isinstance(body, dict):
        return JSONResponse({"error": {"code": "invalid_body"}}, status_code=400)
    return JSONResponse({"id": new_timer_id()}, status_code=201)


async def healthz(_: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


def app() -> Starlette:
    """The floor's application: two routes."""
    return Starlette(
        routes=[
            Route("/timers", create, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
        ]
    )


def main() -> None:
    """Serve the floor on 127.0.0.1 at the port given as the only argument."""
    uvicorn.run(
        app(),
        host="127.0.0.1",
        port=int(sys.argv[1]),
        loop="auto",  # as `timerd api`: uvloop and httptools, both dependencies of timerd
        http="auto",
        log_config=None,
        access_log=False,
        lifespan="off",
        server_header=False,
    )


if __name__ == "__main__":
    main()
