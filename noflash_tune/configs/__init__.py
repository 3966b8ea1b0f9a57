"""Tuned configs: the ``tuned_configs/<device_key>.json`` files, and how they are read, merged and written.

Layered, each module importing only those above it:

- :mod:`.fingerprint`: what an entry's measurements depend on (torch, triton, templates hashes), and why it is stale;
- :mod:`.schema`: the file as objects (device header, entries, the file) and the format they are written in;
- :mod:`.validate`: :func:`parse`, the field-by-field check that refuses a hostile or broken document;
- :mod:`.store`: reading, merging over the config dirs, and atomic writes under a file lock;
- :mod:`.transfer`: import into a config dir and export of one self-describing file.
"""
from .fingerprint import Fingerprint, family_templates_for, stale_reasons, templates_hash_for
from .schema import (DTYPES, SCHEMA, SCHEMAS_READ, TRIAL_KEYS, ConfigError, ConfigFile, ConfigWarning, DeviceInfo,
                     Entry, this_device_info)
from .validate import MAX_FAMILIES, MAX_RUNNERS_UP, parse
from .store import LOCK_TIMEOUT_S, MAX_FILE_BYTES, ConfigSet, dump, load_file, load_for_device, write_file
from .transfer import ExportReport, ImportReport, export, import_file

__all__ = [
    "SCHEMA", "MAX_FILE_BYTES", "ConfigError", "ConfigWarning", "Fingerprint", "DeviceInfo", "Entry",
    "ConfigFile", "ConfigSet", "ImportReport", "ExportReport", "this_device_info", "templates_hash_for",
    "family_templates_for", "stale_reasons", "parse", "load_file", "load_for_device", "dump", "write_file",
    "import_file", "export",
    # the schema's constants and limits
    "SCHEMAS_READ", "DTYPES", "TRIAL_KEYS", "MAX_FAMILIES", "MAX_RUNNERS_UP", "LOCK_TIMEOUT_S",
]
