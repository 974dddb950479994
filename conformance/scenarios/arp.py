"""ARP scenarios: kernel-dataplane-spec.md section 3 (the router's neighbour handling)."""
