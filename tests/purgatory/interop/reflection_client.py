"""grpcio-reflection's client against a server, in a process of its own: what the server says
of itself, as JSON on stdout. Used by the reflection tests (interop and end to end).

    python reflection_client.py HOST:PORT CA CERT KEY SERVICE...

It lists the services, then describes each SERVICE given: its file, its methods (types and
streaming flags) and the fields of every message type they use, all through a DescriptorPool fed
only by the server's answers (ProtoReflectionDescriptorDatabase). Its own process, because
grpcio-reflection registers the grpc.reflection.v1alpha messages in the default descriptor pool
under another file name than jobworker's copy, and a pool refuses a symbol defined twice.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import grpc
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)


def describe_message(message, into: dict) -> None:
    if message.full_name in into:
        return
    into[message.full_name] = [[field.name, field.number, field.type] for field in message.fields]
    for field in message.fields:
        if field.message_type is not None:
            describe_message(field.message_type, into)


def main(target: str, ca: str, cert: str, key: str, *services: str) -> None:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=Path(ca).read_bytes(),
        private_key=Path(key).read_bytes(),
        certificate_chain=Path(cert).read_bytes(),
    )
    # By IP address: both the test kit's and `jobworker certs init`'s server certificates name
    # 127.0.0.1.
    with grpc.secure_channel(target, credentials) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        pool = DescriptorPool(database)
        out: dict = {"services": sorted(database.get_services()), "described": {}, "messages": {}}
        for name in services:
            service = pool.FindServiceByName(name)
            out["described"][name] = {
                "file": service.file.name,
                "methods": {
                    method.name: [
                        method.input_type.full_name,
                        method.output_type.full_name,
                        method.client_streaming,
                        method.server_streaming,
                    ]
                    for method in service.methods
                },
            }
            for method in service.methods:
                describe_message(method.input_type, out["messages"])
                describe_message(method.output_type, out["messages"])
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main(*sys.argv[1:])
