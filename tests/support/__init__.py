"""Helpers every test module may use, each written once: ports, waiting, clocks, PKI."""
