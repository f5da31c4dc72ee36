"""The `mir-archive/1` format: writer, lazy reader, validation. Imports nothing of the project's
other packages and no torch, so a colleague can read an archive with a light install."""
from .reader import Archive, Selection, open_archive
from .records import SampleRecord
from .schema import MODALITIES, SCHEMA_VERSION, ArchiveError, ArchiveLockedError, TextRole, TextTokenRule
from .validate import ValidationReport, validate_archive
from .writer import ArchiveWriter
from .merge import merge_archives

__all__ = ["Archive", "ArchiveError", "ArchiveLockedError", "ArchiveWriter", "MODALITIES", "SCHEMA_VERSION",
           "SampleRecord", "Selection", "TextRole", "TextTokenRule", "ValidationReport", "merge_archives",
           "open_archive", "validate_archive"]
