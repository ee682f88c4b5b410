"""The survey of a bucket by its S3Client: registryd.upkeep.survey on an S3Driver.

The survey and eviction are written once, over any driver; these names
remain for callers that hold a client (tests/test_s3_survey.py).
"""
from __future__ import annotations

import time
from typing import Callable, Mapping

from registryd.storage.s3.client import S3Client
from registryd.storage.s3.driver import S3Driver
from registryd.upkeep.survey import Documents, Survey, SurveyedRepository, take_survey

#: A repository in the bucket, as the survey names it.
S3Repository = SurveyedRepository


async def take_s3_survey(client: S3Client, namespaces: Mapping[str, str], documents: Documents | None = None,
                         clock: Callable[[], float] = time.time) -> Survey:
    """The survey of the bucket ``client`` works on (``namespaces``: mirror folder -> namespace)."""
    return await take_survey(S3Driver(client), namespaces, documents, clock)
