"""nat: conntrack and the Service load balancer (the nat issue; not built yet)."""
