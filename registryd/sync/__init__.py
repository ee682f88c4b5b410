"""Scheduled sync of upstream repositories into the mirror cache (``[[sync]]`` jobs).

``versions`` orders tags, ``schedule`` says when a job runs next,
``upstream`` asks the upstream (patient with 429s, lists page by page),
``state`` keeps a job's progress in the store (a restart resumes it),
``job`` runs one job through the mirror cache's own fill and manifest
code, ``referrers`` finds what is attached to an image, ``scheduler``
runs the jobs of a server, ``report`` turns a run into lines and JSON,
``errors`` says how a run or an image fails.
"""
