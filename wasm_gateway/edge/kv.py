"""``kv.*``: the filters' namespaced KV with TTL, on the shared-state backend's `EdgeStore`."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from ..exceptions import StateError, StateUnavailableError
from ..state.base import EdgeStore, RateLimitedLog
from .codec import ArgReader, EdgeDataError, ErrorCode, encode_i64, encode_kv_list, encode_ok, pack_bytes
from .config import KVNamespaceConfig

__all__ = ["EdgeKV"]

_log = RateLimitedLog(logging.getLogger("wasm_gateway.edge"))
_NOT_FOUND = bytes((1, ErrorCode.NOT_FOUND))
_DELETED = (encode_ok(b"\x00"), encode_ok(b"\x01"))


class EdgeKV:
    """The declared namespaces over one store. Each method takes the filter's granted namespaces and the
    encoded arguments and returns the encoded result; errors raise `EdgeDataError`."""

    def __init__(self, store: EdgeStore, namespaces: Mapping[str, KVNamespaceConfig]) -> None:
        self.store = store
        self.namespaces = {n.encode(): c for n, c in namespaces.items()}

    def _namespace(
        self, args: ArgReader, granted: frozenset[bytes], filter_name: str
    ) -> tuple[bytes, KVNamespaceConfig]:
        ns = args.bytes("namespace")
        if ns not in granted:
            shown = ns.decode("utf-8", "replace")
            if ns in self.namespaces:
                reason = f"namespace {shown!r} is not granted to filter {filter_name!r}"
            else:
                reason = f"no namespace {shown!r} is declared (add [kv.{shown}] and grant it)"
            raise EdgeDataError(ErrorCode.DENIED, reason)
        return ns, self.namespaces[ns]

    @staticmethod
    def _key(args: ArgReader, cfg: KVNamespaceConfig, what: str = "key") -> bytes:
        key = args.bytes(what)
        if len(key) > cfg.max_key_bytes:
            raise EdgeDataError(
                ErrorCode.LIMIT,
                f"{what} of {len(key)} bytes exceeds kv.{cfg.name}.max_key_bytes ({cfg.max_key_bytes})",
            )
        if what == "key" and not key:
            raise EdgeDataError(ErrorCode.BAD_REQUEST, "empty key")
        return key

    @staticmethod
    def _ttl(ttl_ms: int, cfg: KVNamespaceConfig) -> float:
        return cfg.default_ttl_seconds if ttl_ms == 0 else min(ttl_ms / 1000, cfg.max_ttl_seconds)

    def get(self, data: bytes, granted: frozenset[bytes], filter_name: str) -> bytes:
        args = ArgReader(data)
        ns, cfg = self._namespace(args, granted, filter_name)
        key = self._key(args, cfg)
        args.end()
        with _backend_errors("get"):
            value = self.store.get(ns, key)
        return _NOT_FOUND if value is None else encode_ok(pack_bytes(value))

    def set(self, data: bytes, granted: frozenset[bytes], filter_name: str) -> bytes:
        args = ArgReader(data)
        ns, cfg = self._namespace(args, granted, filter_name)
        key = self._key(args, cfg)
        value = args.bytes("value")
        ttl = self._ttl(args.u32("ttl_ms"), cfg)
        args.end()
        if len(value) > cfg.max_value_bytes:
            raise EdgeDataError(
                ErrorCode.LIMIT,
                f"value of {len(value)} bytes exceeds kv.{cfg.name}.max_value_bytes ({cfg.max_value_bytes})",
            )
        with _backend_errors("set"):
            written = self.store.put(ns, key, value, ttl, cfg.max_keys)
        if not written:
            raise _full(cfg)
        return encode_ok()

    def delete(self, data: bytes, granted: frozenset[bytes], filter_name: str) -> bytes:
        args = ArgReader(data)
        ns, cfg = self._namespace(args, granted, filter_name)
        key = self._key(args, cfg)
        args.end()
        with _backend_errors("delete"):
            return _DELETED[self.store.delete(ns, key)]

    def incr(self, data: bytes, granted: frozenset[bytes], filter_name: str) -> bytes:
        args = ArgReader(data)
        ns, cfg = self._namespace(args, granted, filter_name)
        key = self._key(args, cfg)
        delta = args.i64("delta")
        ttl = self._ttl(args.u32("ttl_ms"), cfg)
        args.end()
        try:
            with _backend_errors("incr"):
                total = self.store.incr(ns, key, delta, ttl, cfg.max_keys)
        except ValueError as exc:
            raise EdgeDataError(ErrorCode.CONFLICT, str(exc)) from None
        if total is None:
            raise _full(cfg)
        return encode_ok(encode_i64(total))

    def list(self, data: bytes, granted: frozenset[bytes], filter_name: str) -> bytes:
        args = ArgReader(data)
        ns, cfg = self._namespace(args, granted, filter_name)
        prefix = self._key(args, cfg, "prefix")
        limit = args.u32("limit")
        args.end()
        limit = cfg.max_list if limit == 0 else min(limit, cfg.max_list)
        with _backend_errors("list"):
            keys = self.store.scan(ns, prefix, limit + 1)
        return encode_kv_list(keys[:limit], len(keys) > limit)


def _full(cfg: KVNamespaceConfig) -> EdgeDataError:
    return EdgeDataError(
        ErrorCode.LIMIT, f"namespace {cfg.name!r} holds kv.{cfg.name}.max_keys ({cfg.max_keys}) keys"
    )


class _backend_errors:
    """StateError -> an ``unavailable`` result (logged, rate limited)."""

    def __init__(self, operation: str) -> None:
        self.operation = operation

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        if isinstance(exc, StateError):
            if not isinstance(exc, StateUnavailableError):
                _log.log("kv " + self.operation, logging.ERROR, "edge kv %s failed: %s", self.operation, exc)
            raise EdgeDataError(ErrorCode.UNAVAILABLE, f"kv.{self.operation}: {exc}") from None
