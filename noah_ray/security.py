"""What keeps a run from writing where it should not, or writing secrets at all.

* :func:`safe_name` - the one validator of job, run and method names: a single path segment
  (letters, digits, ``-``, ``_``, ``.``; starting with a letter or digit), so ``..``, ``.`` or
  ``a/b`` can never put ``supernet/``, ``search/`` or ``retrain/`` outside the job's folder.
* :func:`redact` - strips the userinfo of URIs (``s3://KEY:SECRET@host/...``) from any text
  shown to the user.  The userinfo runs to the first ``@`` of the URI, ``/`` included: AWS
  secret keys often hold ``/`` (and ``+``), and users paste them unencoded.
* :func:`tune_without_credentials` - Ray Tune copies ``AWS_ACCESS_KEY_ID`` /
  ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN`` from the driver's environment into every
  trainable's ``runtime_env`` (``ray.tune.execution.class_cache.ENV_VARS_TO_PROPAGATE``), and
  Ray's runtime-env agent logs that runtime environment in plain text (ray-project/ray#28276,
  #39502).  Inside this context the credential names are removed from that set, so workers
  take credentials from their own node's environment / AWS chain and nothing is logged.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

from noah_ray.errors import ConfigError

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
#: a URI's scheme and everything up to its first ``@`` (the URI ends at whitespace or a quote)
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^@\s'\"`]+)@")
#: environment variables holding secrets that must never travel in a Ray runtime_env
SECRET_ENV_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN")


def safe_name(value: object, key: str) -> str:
    """``value`` if it is one safe path segment, else a :class:`ConfigError` naming ``key``."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ConfigError(f"{key}: {value!r} must be one path segment of letters, digits, '-', '_' or '.' "
                          f"starting with a letter or digit (e.g. cifar100-noah)")
    return value


def _is_userinfo(info: str) -> bool:
    """Whether ``info`` (a URI's text between ``scheme://`` and its first ``@``) is credentials: no
    ``/`` in it (the authority's userinfo), or a ``KEY:SECRET`` whose secret holds ``/`` (a ``/``
    before any ``:`` starts the path: ``s3://bucket/key@2x.png`` has none)."""
    return "/" not in info or ":" in info.split("/", 1)[0]


def redact(text: str, mask: str = "***@") -> str:
    """``text`` with the userinfo of every URI replaced by ``mask`` (``""``: removed)."""
    return _USERINFO.sub(lambda m: m.group("scheme") + mask if _is_userinfo(m.group("userinfo")) else m.group(0),
                         text)


def has_userinfo(uri: str) -> bool:
    """Whether ``uri`` carries credentials (:func:`redact` would hide some of it)."""
    m = _USERINFO.match(uri.strip())
    return m is not None and _is_userinfo(m.group("userinfo"))


@contextlib.contextmanager
def tune_without_credentials() -> Iterator[None]:
    """Run Ray Tune without copying credential variables into trial runtime environments."""
    from ray.tune.execution import class_cache

    names = class_cache.ENV_VARS_TO_PROPAGATE
    removed = [n for n in SECRET_ENV_VARS if n in names]
    for n in removed:
        names.discard(n)
    try:
        yield
    finally:
        names.update(removed)
