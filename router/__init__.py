"""router: LPM routing, ARP/neighbours, ICMP, host-gw (the router issue; not built yet)."""
