"""The benchmark harness: wasm-gateway measured side by side with nginx, Express and a bare Python proxy.

Entry point: ``python -m benchmarks [--quick] [--only SYSTEM ...]`` (see ``benchmarks/README.md``).
"""
