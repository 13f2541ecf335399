"""The command-line programs: `jobworker` (the server) and `jobctl` (the client)."""
