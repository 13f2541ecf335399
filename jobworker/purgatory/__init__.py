"""purgatory — jobworker's gRPC transport: gRPC over HTTP/2 (h2) over TLS 1.3 (pyOpenSSL) on Trio.

Knows nothing about jobs. `wire/` is the sans-IO protocol core; `tls.py` the TLS stream.
"""
