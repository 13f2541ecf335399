"""The certificate factory lives in the kit (`jobworker.purgatory.testing`); the tests import it
from there. This re-export remains for tools/bench_purgatory.py, which still imports
`tests.purgatory.certs`; it can go once that imports the kit."""

from jobworker.purgatory.testing import (
    CA,
    CertSet,
    KeyType,
    Leaf,
    client_config,
    make_ca,
    make_cert_set,
    server_config,
    write_pem,
)

__all__ = [
    "CA",
    "CertSet",
    "KeyType",
    "Leaf",
    "client_config",
    "make_ca",
    "make_cert_set",
    "server_config",
    "write_pem",
]
