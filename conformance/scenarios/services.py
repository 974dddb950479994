"""Service scenarios: kernel-dataplane-spec.md sections 4 and 5 (conntrack, kube-proxy)."""
