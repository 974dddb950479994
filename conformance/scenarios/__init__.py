"""The scenarios, one module per part of kernel-dataplane-spec.md; importing registers them."""

from . import arp, bridge, overlay, router, services  # noqa: F401
