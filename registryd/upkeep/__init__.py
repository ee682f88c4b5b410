"""Work the server does on its store by itself, on a schedule.

- ``collector``: mark and sweep of unreferenced blobs (also ``registryd gc``).
- ``survey``: one walk of the store: sizes, what local content keeps, what
  the mirror cache holds and when each of its manifests was last used.
- ``eviction``: keeps the mirror cache under ``[mirror] max_size``.
- ``online_prune``: ``registryd prune`` inside the server (``POST /admin/prune``),
  through the storage interface, so on either driver.
- ``scheduler``: runs collections and surveys in the IO pool, one at a time.
"""
