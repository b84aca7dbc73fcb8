"""Command line: ``wasm-gateway serve | check | compile | reload | version``. The only module that prints and exits."""

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
    serve.add_argument("--pid-file", help="write the process id here (overrides server.pid_file)")

    check = sub.add_parser("check", help="validate a config and load every filter module; exit 0 or 1")
    check.add_argument("--config", "-c", required=True)

    compile_ = sub.add_parser("compile", help="precompile a Wasm module for this wasmtime and machine")
    compile_.add_argument("module")
    compile_.add_argument("-o", "--output", required=True)

    reload = sub.add_parser(
        "reload",
        help="validate a config, then make the running gateway load it (SIGHUP to the pid in the pid file)",
    )
    reload.add_argument("--config", "-c", help="the running gateway's config file (validated first)")
    reload.add_argument("--pid-file", help="the running gateway's pid file (default: server.pid_file)")
    reload.add_argument(
        "--timeout", type=float, default=30.0, help="seconds to wait for /readyz to show the new config"
    )
    reload.add_argument("--no-wait", action="store_true", help="send the signal and return")
    reload.add_argument("--workers", type=int, help="worker processes to wait for (default: server.workers)")

    sub.add_parser("version", help="print versions")

    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "check":
            return _check(args.config)
        if args.command == "compile":
            return _compile(args.module, args.output)
        if args.command == "reload":
            return _reload(args)
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
    from .reload import PROCESS_SIGNALS_ENV
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
    env[PROCESS_SIGNALS_ENV] = "1"  # SIGHUP reloads, SIGTERM drains (see reload.py)
    pid_file = args.pid_file or (str(server.pid_file) if server.pid_file else None)

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
        pid_file=pid_file,
    )
    return serve(options)


def _reload(args: argparse.Namespace) -> int:
    """Validate the config (and load its filters), signal the gateway, wait until /readyz shows it."""
    import signal
    import time

    config: GatewayConfig | None = None
    digest: str | None = None
    if args.config:
        from .reload import read_config

        config, digest = read_config(Path(args.config).resolve())
        problems = _check_filters(config)
        if problems:
            for problem in problems:
                print(problem, file=sys.stderr)
            print("wasm-gateway: not reloading: the running gateway keeps its config", file=sys.stderr)
            return 1
    pid_file = args.pid_file or (str(config.server.pid_file) if config and config.server.pid_file else None)
    if pid_file is None:
        print("wasm-gateway: reload needs --pid-file, or --config with server.pid_file set", file=sys.stderr)
        return 1
    try:
        pid = int(Path(pid_file).read_text().strip())
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError) as exc:
        reason = "no such process (stale pid file?)" if isinstance(exc, ProcessLookupError) else str(exc)
        print(f"wasm-gateway: cannot signal the gateway from {pid_file}: {reason}", file=sys.stderr)
        return 1
    if args.no_wait or config is None or digest is None:
        print(f"sent SIGHUP to {pid}")
        return 0
    deadline = time.monotonic() + args.timeout
    state: dict[str, object] = {}
    # With several workers each answer comes from one of them: ask on fresh connections until every worker
    # has answered with the new config.
    workers = args.workers or config.server.workers
    switched: set[object] = set()
    while time.monotonic() < deadline:
        state = _ready_state(config)
        if state.get("hash") == digest:
            switched.add(state.get("worker"))
            if len(switched) >= workers:
                print(f"reloaded: config {digest}")
                return 0
        time.sleep(0.05)
    reload_state = state.get("reload")
    error = reload_state.get("error") if isinstance(reload_state, dict) else None
    print(
        f"wasm-gateway: the gateway did not switch to config {digest} within {args.timeout:g} s "
        f"(it reports {state.get('hash', 'nothing')})" + (f": {error}" if error else ""),
        file=sys.stderr,
    )
    return 1


def _ready_state(config: GatewayConfig) -> dict[str, object]:
    """The ``config`` object of the gateway's /readyz answer (empty when it cannot be read)."""
    import http.client

    import orjson

    host = config.server.host
    host = "127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host == "::" else host
    try:
        conn = http.client.HTTPConnection(host, config.server.port, timeout=2)
        try:
            conn.request("GET", config.server.ready_path, headers={"connection": "close"})
            data = orjson.loads(conn.getresponse().read())
        finally:
            conn.close()
    except (OSError, ValueError, http.client.HTTPException):
        return {}
    found = data.get("config") if isinstance(data, dict) else None
    return found if isinstance(found, dict) else {}


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
