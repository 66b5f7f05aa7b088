"""Interop: what goes in and out of the package in other formats.  Original NOAH files
(:mod:`.noah_import`), subnet files of any format (:mod:`.subnet_file`), subnet artifacts
(:mod:`.artifact`), peft export (:mod:`.peft_export`) and import (:mod:`.peft_import`).

A layer above ``nn``, beside ``search`` (the two never import each other).  This module only
re-exports the public functions (``noah_ray.interop.reference_subnet("cifar100")``).
"""

from noah_ray.interop.artifact import (
                                       ARTIFACT_FORMAT,
                                       ARTIFACT_VERSION,
                                       check_init_artifact,
                                       load_init_weights,
                                       load_subnet,
                                       model_from_run,
                                       read_artifact,
                                       save_subnet,
)
from noah_ray.interop.noah_import import (
                                       DEFAULT_MODEL,
                                       REFERENCE_DIR,
                                       NoahImport,
                                       dataset_from_filename,
                                       format_import,
                                       import_noah,
                                       markdown_table,
                                       parse_filename,
                                       read_noah_subnet,
                                       reference_files,
                                       reference_subnet,
)
from noah_ray.interop.peft_export import PEFT_UNSUPPORTED, PeftExport, export_peft
from noah_ray.interop.subnet_file import read_subnet

__all__ = ["ARTIFACT_FORMAT", "ARTIFACT_VERSION", "DEFAULT_MODEL", "PEFT_UNSUPPORTED", "REFERENCE_DIR", "NoahImport",
           "PeftExport", "check_init_artifact", "dataset_from_filename", "export_peft", "format_import",
           "import_noah", "load_init_weights", "load_subnet", "markdown_table", "model_from_run", "parse_filename",
           "read_artifact", "read_noah_subnet", "read_subnet", "reference_files", "reference_subnet", "save_subnet"]
