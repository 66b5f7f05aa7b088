"""Reading a subnet file of any format the package knows: :func:`read_subnet`.

A subnet config YAML or JSON (:meth:`noah_ray.space.SubnetConfig.load`) or an original NOAH
subnet file, whose ``RETRAIN`` block :func:`noah_ray.interop.noah_import.read_noah_subnet` reads.
``retrain.subnet`` accepts all three, so the stages read it through here.
"""

from __future__ import annotations

from pathlib import Path

from noah_ray.errors import ConfigError
from noah_ray.interop.noah_import import is_noah_file, read_noah_subnet
from noah_ray.space import SubnetConfig


def read_subnet(path: str | Path) -> SubnetConfig:
    """The subnet in ``path``: a NOAH file when its YAML holds a ``RETRAIN`` block, else a subnet
    config (YAML, or JSON by suffix); one :class:`ConfigError` naming the file otherwise."""
    p = Path(path)
    if p.is_file() and p.suffix != ".json":
        try:
            text = p.read_text()
        except UnicodeDecodeError:
            raise ConfigError(f"{p}: not a text (UTF-8) file; give a subnet YAML / JSON file") from None
        if "RETRAIN" in text and is_noah_file(text):
            return read_noah_subnet(p)
    return SubnetConfig.load(p)
