"""overlay: flannel-compatible VXLAN on UDP 8472 (wire format, software GSO, the VTEP data path)."""
