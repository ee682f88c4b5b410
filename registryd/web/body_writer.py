"""The serial writer of upload bodies: it lives in registryd.serial_writer, where mirror fills use it too."""
from registryd.serial_writer import MIN_BATCH, QUEUE_LIMIT, SerialWriter

__all__ = ["MIN_BATCH", "QUEUE_LIMIT", "SerialWriter"]
