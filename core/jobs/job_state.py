"""A job's states, without the database's row (core.jobs.job): what the command line's
parser needs, importable without SQLAlchemy."""

from __future__ import annotations

import enum


class JobState(str, enum.Enum):  # noqa: UP042 - StrEnum would change str()/f-strings of members (logs, messages)
    queued = "queued"
    fetching = "fetching"
    decoding = "decoding"
    separating = "separating"
    encoding = "encoding"
    delivering = "delivering"
    done = "done"
    failed = "failed"
    cancelled = "cancelled"


RUNNING = (JobState.fetching, JobState.decoding, JobState.separating, JobState.encoding)
FINAL = (JobState.done, JobState.failed, JobState.cancelled)
UNFINISHED = (JobState.queued, *RUNNING, JobState.delivering)
