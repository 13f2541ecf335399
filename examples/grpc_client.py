#!/usr/bin/env python3
"""A plain grpcio client of jobworker, with the stubs jobworker ships (`jobworker.v1`).

    pip install jobworker grpcio
    JOBCTL_SERVER=127.0.0.1:50051 JOBCTL_CERT=alice/client.crt JOBCTL_KEY=alice/client.key \\
        JOBCTL_CA=alice/ca.crt python examples/grpc_client.py sh -c 'echo hello; exit 3'

Starts the command as a job, streams its output as the server reads it, then waits for its
end and prints how it ended; exits with the job's exit code. The certificate files are the
ones `jobworker certs init`/`certs add` write for a user (JOBCTL_* as jobctl reads them).
"""

from __future__ import annotations

import os
import sys

import grpc

from jobworker.v1 import jobworker_pb2 as pb
from jobworker.v1 import jobworker_pb2_grpc


def channel_from_env() -> grpc.Channel:
    def read(name: str) -> bytes:
        with open(os.environ[name], "rb") as f:
            return f.read()

    credentials = grpc.ssl_channel_credentials(
        root_certificates=read("JOBCTL_CA"),
        private_key=read("JOBCTL_KEY"),
        certificate_chain=read("JOBCTL_CERT"),
    )
    return grpc.secure_channel(os.environ.get("JOBCTL_SERVER", "127.0.0.1:50051"), credentials)


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: grpc_client.py COMMAND [ARG...]", file=sys.stderr)
        return 2
    with channel_from_env() as channel:
        jobs = jobworker_pb2_grpc.JobServiceStub(channel)
        request = pb.StartJobRequest(
            command=argv[0], args=argv[1:], limits=pb.Limits(memory_bytes=256 * 2**20)
        )
        started = jobs.StartJob(request, timeout=10)
        print(f"job {started.job_id}: {pb.JobState.Name(started.status.state)}", file=sys.stderr)
        out = {pb.LOG_STREAM_STDOUT: sys.stdout.buffer, pb.LOG_STREAM_STDERR: sys.stderr.buffer}
        # follow=True: everything written so far, then live output until the job ends.
        for chunk in jobs.GetJobLogs(pb.GetJobLogsRequest(job_id=started.job_id, follow=True)):
            if chunk.data:
                out[chunk.stream].write(chunk.data)
                out[chunk.stream].flush()
        status = jobs.WaitJob(pb.WaitJobRequest(job_id=started.job_id)).status
        print(
            f"job {status.job_id}: {pb.JobState.Name(status.state)}, exit code {status.exit_code}",
            file=sys.stderr,
        )
        return status.exit_code


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except grpc.RpcError as exc:
        print(f"grpc_client: {exc.code().name}: {exc.details()}", file=sys.stderr)
        sys.exit(1)
