"""Where Ray Tune and Ray Train keep their own files: <results>/ray, on the results' own filesystem."""

from __future__ import annotations

from scaling_lab import results


def ray_storage(store: results.Store) -> dict:
    """RunConfig arguments for Tune and Train.

    The filesystem is handed over already built, because a results URI may carry options in its query
    (s3://bucket/prefix?endpoint_override=...&region=...) that a storage_path string with "/ray" appended
    would lose. Credentials stay with the environment or the instance profile: the filesystem holds none.
    """
    return {"storage_path": store.path("ray"), "storage_filesystem": store.fs}
