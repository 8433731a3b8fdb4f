"""The Python client (`Client`) and the `llamadist` command line."""

from client.client import Client, ClientError, Completion

__all__ = ["Client", "ClientError", "Completion"]
