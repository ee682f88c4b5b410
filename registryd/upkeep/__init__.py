"""Work the server does on its store by itself, on a schedule.

- ``collector``: mark and sweep of unreferenced blobs (also ``registryd gc``).
- ``survey``: one walk of the store: sizes, what local content keeps, what
  the mirror cache holds and when each of its manifests was last used;
  ``s3_survey`` builds the same survey from listings of a shared bucket.
- ``eviction``: keeps the mirror cache under ``[mirror] max_size`` (on S3 by
  deleting manifests and links only, then one collection: ``s3_survey``).
- ``s3_collector`` and ``s3_marker``: garbage collection on a shared bucket
  (trash, re-mark, restore), safe while every node serves.
- ``online_prune``: ``registryd prune`` inside the server (``POST /admin/prune``),
  through the storage interface, so on either driver.
- ``scheduler``: runs collections and surveys on timers, one at a time.
"""
