"""Work the server does on its store by itself, on a schedule.

- ``collector``: mark and sweep of unreferenced blobs (also ``registryd gc``),
  over any driver (trash, re-mark, restore), safe while every node serves.
- ``marker``: the mark: what the repositories keep, and what is in the trash.
- ``survey``: listings of the store, over any driver: sizes, what local
  content keeps, what the mirror cache holds and when each of its manifests
  was last used.
- ``eviction``: keeps the mirror cache under ``[mirror] max_size``, over any
  driver (on a shared bucket its freed blobs go by one collection).
- ``online_prune``: ``registryd prune`` inside the server (``POST /admin/prune``),
  through the storage interface, so on either driver.
- ``scheduler``: runs collections and surveys on timers, one at a time.
"""
