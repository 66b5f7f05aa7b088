"""Interop entry points, one import away: original NOAH files (:mod:`noah_ray.noah_import`),
subnet artifacts (:mod:`noah_ray.artifact`), peft export (:mod:`noah_ray.peft_export`) and
import (:mod:`noah_ray.peft_import`).  Each concept lives in its own module; this one only
re-exports their public functions (``noah_ray.interop.reference_subnet("cifar100")``).
"""

from noah_ray.artifact import (ARTIFACT_FORMAT, ARTIFACT_VERSION, check_init_artifact, load_init_weights,
                               load_subnet, model_from_run, read_artifact, save_subnet)
from noah_ray.noah_import import (DEFAULT_MODEL, REFERENCE_DIR, NoahImport, dataset_from_filename, format_import,
                                  import_noah, markdown_table, parse_filename, read_noah_subnet, reference_files,
                                  reference_subnet)
from noah_ray.peft_export import PEFT_UNSUPPORTED, PeftExport, export_peft

__all__ = ["ARTIFACT_FORMAT", "ARTIFACT_VERSION", "DEFAULT_MODEL", "PEFT_UNSUPPORTED", "REFERENCE_DIR", "NoahImport",
           "PeftExport", "check_init_artifact", "dataset_from_filename", "export_peft", "format_import",
           "import_noah", "load_init_weights", "load_subnet", "markdown_table", "model_from_run", "parse_filename",
           "read_artifact", "read_noah_subnet", "reference_files", "reference_subnet", "save_subnet"]
