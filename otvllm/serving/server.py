"""`otvllm serve`: the app on uvicorn. SIGTERM or Ctrl-C drains: the listening socket
closes, running requests finish (within --drain-timeout), then the engine loop stops and
the trace is flushed by the caller (the CLI)."""

import os
import sys

import uvicorn

from otvllm.serving.app import build_app


def serve(args, llm) -> int:
    name = args.served_model_name or os.path.basename(os.path.normpath(llm.config.model))
    app = build_app(llm, name, args.max_queue)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                            timeout_graceful_shutdown=args.drain_timeout, lifespan="on")
    server = uvicorn.Server(config)
    announce = server.startup

    async def startup(sockets=None):
        await announce(sockets)
        if server.started:
            host, port = server.servers[0].sockets[0].getsockname()[:2]
            print(f"otvllm: serving {name} on http://{host}:{port}", file=sys.stderr, flush=True)

    server.startup = startup
    server.run()
    return 0 if server.started else 1
