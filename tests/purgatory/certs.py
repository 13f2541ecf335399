"""The certificate factory lives in the kit (`jobworker.purgatory.testing`); this re-exports it
for the tests that import it from here."""

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

_write = write_pem  # the name tests/service imports

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
