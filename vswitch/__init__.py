"""vswitch: a Kubernetes node dataplane in userspace Python.

The core (packet, stage, fdb, bridge, ports) knows nothing of the router,
NAT or overlay packages; ``vswitch.node`` and the daemon wire them together.
"""

__version__ = "0.1.0"

__all__ = ["SimNode", "Result", "Emitted"]


def __getattr__(name):  # lazy: `import vswitch` stays cheap and never pulls in router/nat/overlay
    if name in __all__:
        from . import sim
        return getattr(sim, name)
    raise AttributeError(f"module 'vswitch' has no attribute {name!r}")
