"""overlay: the VXLAN encapsulator on UDP 8472 (the overlay issue; not built yet)."""
