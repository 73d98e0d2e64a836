"""Where adapter files come from: a directory under `--adapter-root`, an HTTP upload, or S3.

Each source turns a user's reference into a local directory holding adapter_config.json +
adapter_model.safetensors (`AdapterSource.materialize`); validating their contents is a later step.
"""

from loraplex.adapters.sources.base import ADAPTER_FILES, AdapterSource
from loraplex.adapters.sources.local import LocalDirSource
from loraplex.adapters.sources.s3 import S3Source, S3UnavailableError, parse_s3_url
from loraplex.adapters.sources.upload import UploadSource

__all__ = [
    "ADAPTER_FILES",
    "AdapterSource",
    "LocalDirSource",
    "S3Source",
    "S3UnavailableError",
    "UploadSource",
    "parse_s3_url",
]
