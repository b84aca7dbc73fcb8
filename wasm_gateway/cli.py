"""Command line: ``wasm-gateway serve | check | compile | version``. The only module that prints and exits."""

from __future__ import annotations

import argparse
import os
import platform
import socket
import sys
import threading
from pathlib import Path

from . import __version__
from .config import GatewayConfig, load_config
from .exceptions import GatewayError

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="wasm-gateway", description="An ASGI gateway running Proxy-Wasm filters."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway (with no --config: the embedded demo)")
    serve.add_argument("--config", "-c", help="TOML config file (default: the embedded demo config)")
    serve.add_argument("--host", help="listen address (overrides server.host)")
    serve.add_argument("--port", type=int, help="listen port (overrides server.port)")
    serve.add_argument("--workers", type=int, help="worker processes (overrides server.workers)")

    check = sub.add_parser("check", help="validate a config and load every filter module; exit 0 or 1")
    check.add_argument("--config", "-c", required=True)

    compile_ = sub.add_parser("compile", help="precompile a Wasm module for this wasmtime and machine")
    compile_.add_argument("module")
    compile_.add_argument("-o", "--output", required=True)

    sub.add_parser("version", help="print versions")

    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "check":
            return _check(args.config)
        if args.command == "compile":
            return _compile(args.module, args.output)
        return _version()
    except GatewayError as exc:
        print(f"wasm-gateway: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _version() -> int:
    from .runtime.engine import WASMTIME_VERSION  # wasmtime-py has no __version__

    print(f"wasm-gateway {__version__}")
    print(f"python {platform.python_version()}")
    print(f"wasmtime {WASMTIME_VERSION}")
    return 0


def _check(path: str) -> int:
    config = load_config(path)
    problems = _check_filters(config)
    if problems:
        for problem in problems:
            print(problem, file=sys.stderr)
        return 1
    print(
        f"{path}: ok ({len(config.routes)} routes, {len(config.upstreams)} upstreams, {len(config.filters)} filters)"
    )
    return 0


def _check_filters(config: GatewayConfig) -> list[str]:
    """Load every filter module once (compile, link, start, configure); return the error messages."""
    if not config.filters:
        return []
    from .filtering import check_filters

    return check_filters(config)


def _compile(module: str, output: str) -> int:
    from .runtime.engine import precompile

    precompile(Path(module), Path(output))  # FilterLoadError (a GatewayError) names the file on failure
    print(f"{output}: precompiled {module}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from .examples import DEMO_ORIGIN_ENV, default_config_path
    from .server import ServeOptions, limits_for, serve

    env: dict[str, str] = {}
    demo = args.config is None
    if demo:
        if DEMO_ORIGIN_ENV not in os.environ:
            port = _start_demo_origin()
            os.environ[DEMO_ORIGIN_ENV] = f"127.0.0.1:{port}"
        env[DEMO_ORIGIN_ENV] = os.environ[DEMO_ORIGIN_ENV]
        config_path = default_config_path()
    else:
        config_path = Path(args.config).resolve()
    config = load_config(config_path)
    problems = _check_filters(config)
    if problems:
        for problem in problems:
            print(problem, file=sys.stderr)
        return 1
    server = config.server
    host = args.host or server.host
    port = server.port if args.port is None else args.port
    workers = args.workers or server.workers
    env["WASM_GATEWAY_CONFIG"] = str(config_path)
    os.environ["WASM_GATEWAY_CONFIG"] = str(config_path)

    def started(bound_host: str, bound_port: int) -> None:
        base = f"http://{'127.0.0.1' if bound_host in ('0.0.0.0', '::') else bound_host}:{bound_port}"
        print(
            f"wasm-gateway {__version__} listening on {base} ({workers} worker{'s' if workers > 1 else ''})"
        )
        if demo:
            token = demo_token(
                os.environ.get("WASM_GATEWAY_DEMO_JWT_SECRET", "demo-secret-change-me-0123456789abcdef")
            )
            print("embedded demo config; try:")
            print(f"  curl {base}/echo                                    # what the origin received")
            print(f"  curl -i {base}/admin/                               # 401: a plain header guard")
            print(f"  curl {base}/api/private/echo -H 'x-api-key: demo-key'")
            print(f"  curl {base}/api/private/echo -H 'authorization: Bearer {token}'")
            print(
                f"  for i in $(seq 7); do curl -s -o /dev/null -w '%{{http_code}} ' {base}/api/limited; done"
                "   # 5 x 200, then 429"
            )
            print(f"  curl {base}/api/geo                                 # answered by the geo filter")
            print(
                f"  curl -i {base}/api/transform/                       # rewritten path, upper-cased message"
            )
        print(f"health: {base}{server.health_path}  metrics: {base}{config.metrics.path}", flush=True)

    options = ServeOptions(
        app="wasm_gateway.app:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        limits=limits_for(server),
        max_concurrent_requests=server.max_concurrent_requests,
        keepalive_timeout=server.timeouts.idle,
        graceful_shutdown_timeout=server.timeouts.graceful_shutdown,
        log_level=config.log.level,
        metrics_multiproc_dir=_multiproc_dir(workers),
        env=env,
        on_started=started,
    )
    return serve(options)


def demo_token(secret: str, ttl: int = 86_400) -> str:
    """An HS256 JWT the embedded demo's auth filter accepts (sub demo-user, valid for a day)."""
    import base64
    import hashlib
    import hmac
    import time

    import orjson

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    now = int(time.time())
    claims = {"sub": "demo-user", "iss": "wasm-gateway-demo", "aud": "demo", "iat": now, "exp": now + ttl}
    signing_input = b64(orjson.dumps({"alg": "HS256", "typ": "JWT"})) + "." + b64(orjson.dumps(claims))
    signature = hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64(signature)


def _multiproc_dir(workers: int) -> str | None:
    if workers <= 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return None
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.path.join(
        os.environ.get("TMPDIR", "/tmp"), f"wasm-gateway-metrics-{os.getpid()}"
    )


def _start_demo_origin() -> int:
    """Serve the demo origin from a daemon thread on a free loopback port; return the port."""
    import uvicorn

    from .examples import demo_origin

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port: int = sock.getsockname()[1]
    config = uvicorn.Config(demo_origin, log_level="warning", access_log=False, lifespan="off")
    server = uvicorn.Server(config)  # off the main thread uvicorn leaves signals alone
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="demo-origin")
    thread.start()
    return port


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
