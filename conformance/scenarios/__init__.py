"""The scenarios, one module per part of kernel-dataplane-spec.md; importing registers them."""

from . import arp, bridge, overlay, router, router_more, services  # noqa: F401
