"""vswitch: a Kubernetes node dataplane in userspace Python.

The core (packet, stage, fdb, bridge, ports) knows nothing of the router,
NAT or overlay packages; ``vswitch.node`` and the daemon wire them together.
"""

__version__ = "0.1.0"
