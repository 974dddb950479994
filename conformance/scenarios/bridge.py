"""Bridge scenarios: kernel-dataplane-spec.md section 1 (cni0)."""
