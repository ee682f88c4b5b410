"""registryd: an OCI registry appliance on Twisted."""
__version__ = "0.1.0"
