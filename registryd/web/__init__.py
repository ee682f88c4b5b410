"""Web layer: the /v2 API as a Klein app, and the request class that streams bodies."""
