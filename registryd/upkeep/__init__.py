"""Work the server does on its store by itself, on a schedule.

- ``collector``: mark and sweep of unreferenced blobs (also ``registryd gc``).
- ``survey``: listings of the store, over any driver: sizes, what local
  content keeps, what the mirror cache holds and when each of its manifests
  was last used.
- ``eviction``: keeps the mirror cache under ``[mirror] max_size``, over any
  driver (on a shared bucket its freed blobs go by one collection).
- ``s3_collector`` and ``s3_marker``: garbage collection on a shared bucket
  (trash, re-mark, restore), safe while every node serves.
- ``online_prune``: ``registryd prune`` inside the server (``POST /admin/prune``),
  through the storage interface, so on either driver.
- ``scheduler``: runs collections and surveys on timers, one at a time.
"""
