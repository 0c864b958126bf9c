"""Where a job's files live on local disk: `<root>/<job id>/input.<ext>` and `.../stems/`."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_filename(name: str, fallback: str = "track") -> str:
    """A file name that is safe on every filesystem and in a URL path."""
    stem = _SAFE.sub("_", Path(name).name).strip("._") or fallback
    return stem[:120]


class LocalStorage:
    """Job folders under one root. In embedded mode the worker shares this disk."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def job_dir(self, job_id: int) -> Path:
        return self.root / str(int(job_id))

    def input_path(self, job_id: int, source_name: str) -> Path:
        suffix = Path(safe_filename(source_name)).suffix.lower()[:10]
        return self.job_dir(job_id) / f"input{suffix}"

    def stems_dir(self, job_id: int) -> Path:
        return self.job_dir(job_id) / "stems"

    def stem_file(self, job_id: int, name: str) -> Path:
        path = (self.stems_dir(job_id) / name).resolve()
        if self.stems_dir(job_id).resolve() not in path.parents:
            raise ValueError("path escapes the job folder")
        return path

    def delete(self, job_id: int) -> None:
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)

    def delete_input(self, job_id: int) -> None:
        for path in self.job_dir(job_id).glob("input*"):
            path.unlink(missing_ok=True)
