"""Overlay scenarios: kernel-dataplane-spec.md section 6 (flannel.1)."""
