"""conformance: kernel-vs-vswitch differential scenarios (the conformance issue; not built yet)."""
