"""Labs of nodes and pods built from network namespaces (inside a sandbox)."""

from .lab import LabError, down, exec_argv, exec_in, socket_for, state, status_rows, up
from .topology import Topology, load, parse

__all__ = ["LabError", "Topology", "down", "exec_argv", "exec_in", "load", "parse", "socket_for", "state",
           "status_rows", "up"]
