"""One place for every read and write: local paths, ``file://`` and ``s3://`` through pyarrow
filesystems.

Credentials come from the environment / the AWS credential chain only; they are never passed
to pyarrow explicitly, so filesystems pickled into Ray tasks carry no secrets.  The S3
endpoint and region may be given (config ``storage_endpoint``) or taken from
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` and ``AWS_REGION`` / ``AWS_DEFAULT_REGION``.

Writes are atomic: data goes to a temporary name in the same directory and is moved into
place (local rename) or uploaded as one object (S3 PUT is atomic per object), so a reader
never sees a half-written file.
"""

from __future__ import annotations

import contextlib
import io
import os
import posixpath
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from noah_ray.errors import ConfigError
from noah_ray.security import has_userinfo, redact
from noah_ray.store.tables import SCHEMA_VERSION, TABLES, conform, upgrade


@dataclass(frozen=True)
class Location:
    """A resolved storage URI: a pyarrow filesystem and a path inside it."""

    uri: str
    fs: pafs.FileSystem
    path: str
    endpoint: str | None = None

    def join(self, *parts: str) -> Location:
        return Location(self.uri.rstrip("/") + "/" + "/".join(parts), self.fs,
                        posixpath.join(self.path, *parts), self.endpoint)

    @property
    def is_s3(self) -> bool:
        return self.uri.startswith("s3://")


def _endpoint(endpoint: str | None) -> str | None:
    return endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def _region() -> str | None:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")


def s3_filesystem(endpoint: str | None = None) -> pafs.S3FileSystem:
    endpoint = _endpoint(endpoint)
    kwargs: dict[str, Any] = {"connect_timeout": 3, "request_timeout": 20,
                    "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=3)}
    region = _region()
    if region:
        kwargs["region"] = region
    if endpoint:
        if has_userinfo(endpoint):
            raise ConfigError(f"S3 endpoint {redact(endpoint)!r} carries credentials; remove them (they would be "
                              f"logged) and give them through the environment / AWS credential chain")
        parsed = urlparse(endpoint)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ConfigError(f"S3 endpoint {endpoint!r} is not a URL; use e.g. http://127.0.0.1:9000")
        kwargs["endpoint_override"] = parsed.netloc
        kwargs["scheme"] = parsed.scheme
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str, endpoint: str | None = None) -> Location:
    """Turn ``/dir``, ``./dir``, ``file:///dir`` or ``s3://bucket/prefix`` into a Location."""
    if not isinstance(uri, str) or not uri.strip():
        raise ConfigError(f"storage URI {uri!r} is empty; give a directory or s3://bucket/prefix")
    if has_userinfo(uri):
        raise ConfigError(f"URI {redact(uri)!r} carries credentials; remove them from the URI (they would be "
                          f"logged) and give them through the environment / AWS credential chain")
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ConfigError(f"storage URI {uri!r} has no bucket; use s3://bucket/prefix")
        path = (parsed.netloc + parsed.path).rstrip("/")
        return Location(uri.rstrip("/"), s3_filesystem(endpoint), path, _endpoint(endpoint))
    if parsed.scheme == "file":
        return Location("file://" + os.path.abspath(parsed.path), pafs.LocalFileSystem(), os.path.abspath(parsed.path))
    if parsed.scheme and len(parsed.scheme) > 1:
        raise ConfigError(f"storage URI {uri!r}: scheme {parsed.scheme!r} unsupported; use a path, file:// or s3://")
    path = os.path.abspath(os.path.expanduser(uri))
    return Location(path, pafs.LocalFileSystem(), path)


def check_writable(loc: Location) -> None:
    """Fail fast with one line if ``loc`` cannot be written (bad bucket, unreachable endpoint)."""
    probe = loc.join(f".probe-{uuid.uuid4().hex}")
    try:
        loc.fs.create_dir(loc.path, recursive=True)
        with loc.fs.open_output_stream(probe.path) as f:
            f.write(b"ok")
        loc.fs.delete_file(probe.path)
        remove_markers(loc)
    except (OSError, pa.ArrowException) as e:
        where = f" (endpoint {loc.endpoint})" if loc.endpoint else ""
        msg = str(e).splitlines()[0][:200]
        raise ConfigError(f"storage {loc.uri!r}{where} is not writable: {msg}; "
                          f"check the bucket, endpoint and credentials") from None


#: zero-byte objects Ray leaves to check that its storage is writable
RAY_MARKERS = (".validate_storage_marker",)


def remove_markers(loc: Location) -> None:
    """Delete the zero-byte directory-marker objects (``<prefix>/``) under an ``s3://`` location
    and above it, and Ray's storage-check markers under it; returns how many were deleted.

    S3 has no directories: pyarrow's ``create_dir`` writes such markers and its ``delete_*``
    write one for a parent left empty, for Ray Train / Tune and us alike.  The stages call this
    when they end (:func:`tidy`).  Deleted through the S3 API (boto3), which recreates nothing."""
    if not loc.is_s3:
        return
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, _, prefix = loc.path.partition("/")
    parts = [p for p in prefix.split("/") if p]
    doomed = {"/".join(parts[:i]) + "/" for i in range(1, len(parts))}    # the markers above loc
    client = boto3.client("s3", endpoint_url=loc.endpoint, region_name=_region())
    try:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for obj in (o for page in pages for o in page.get("Contents", [])):
            key = obj["Key"]
            inside = not prefix or key == prefix + "/" or key.startswith(prefix + "/")
            if inside and obj["Size"] == 0 and (key.endswith("/") or posixpath.basename(key) in RAY_MARKERS):
                doomed.add(key)
        keys = sorted(doomed)
        for i in range(0, len(keys), 1000):
            client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys[i:i + 1000]],
                                                         "Quiet": True})
    except (BotoCoreError, ClientError) as e:
        raise OSError(f"cannot tidy {loc.uri}: {e}") from None


@contextlib.contextmanager
def tidy(loc: Location) -> Iterator[None]:
    """Run a block that writes through pyarrow / Ray under ``loc``, then :func:`remove_markers`
    (also when the block fails; a failure to tidy only leaves markers behind)."""
    try:
        yield
    finally:
        try:
            remove_markers(loc)
        except OSError:
            pass


def exists(loc: Location) -> bool:
    return cast(bool, loc.fs.get_file_info(loc.path).type != pafs.FileType.NotFound)


def read_bytes(loc: Location) -> bytes:
    try:
        with loc.fs.open_input_stream(loc.path) as f:
            return cast(bytes, f.read())
    except FileNotFoundError:
        raise ConfigError(f"{loc.uri!r} does not exist; check the path") from None


def write_bytes(loc: Location, data: bytes) -> None:
    """Atomic write: temporary file + rename locally, a single PUT on S3."""
    parent = posixpath.dirname(loc.path)
    if not loc.is_s3:
        loc.fs.create_dir(parent, recursive=True)
        tmp = posixpath.join(parent, f".tmp-{uuid.uuid4().hex}-{posixpath.basename(loc.path)}")
        with loc.fs.open_output_stream(tmp) as f:
            f.write(data)
        loc.fs.move(tmp, loc.path)
    else:
        with loc.fs.open_output_stream(loc.path) as f:
            f.write(data)


def append_bytes(loc: Location, data: bytes) -> None:
    """Append ``data`` to a local file (created with its folder if missing).  S3 objects cannot
    be appended to; write one object per record there (see :mod:`noah_ray.store.statelog`)."""
    if loc.is_s3:
        raise ValueError(f"{loc.uri}: S3 has no append; write one object per record")
    loc.fs.create_dir(posixpath.dirname(loc.path), recursive=True)
    with loc.fs.open_append_stream(loc.path) as f:
        f.write(data)


def delete(loc: Location) -> None:
    """Remove the file or folder at ``loc`` (nothing if it does not exist); on S3 without
    leaving a directory marker for the parent (see :func:`remove_markers`)."""
    kind = loc.fs.get_file_info(loc.path).type
    if kind == pafs.FileType.Directory:
        loc.fs.delete_dir(loc.path)
    elif kind == pafs.FileType.File:
        loc.fs.delete_file(loc.path)
    if kind != pafs.FileType.NotFound and loc.is_s3:
        remove_markers(Location(posixpath.dirname(loc.uri), loc.fs, posixpath.dirname(loc.path), loc.endpoint))


def move_dir(src: Location, dst: Location) -> None:
    """Move folder ``src`` to ``dst`` (same filesystem): a rename locally; on S3 (no renames)
    every object is copied, then ``src`` deleted, so nothing is lost if this stops half-way."""
    if not src.is_s3:
        src.fs.create_dir(posixpath.dirname(dst.path), recursive=True)
        src.fs.move(src.path, dst.path)
        return
    for f in list_files(src):
        src.fs.copy_file(f.path, posixpath.join(dst.path, posixpath.relpath(f.path, src.path)))
    delete(src)


def write_text(loc: Location, text: str) -> None:
    write_bytes(loc, text.encode())


def read_text(loc: Location) -> str:
    return read_bytes(loc).decode()


def list_files(loc: Location, suffix: str = "") -> list[Location]:
    """Files under ``loc`` (recursive), ignoring temporary and hidden files; sorted."""
    if not exists(loc):
        return []
    infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True))
    out = []
    for info in infos:
        name = posixpath.basename(info.path)
        if info.type == pafs.FileType.File and not name.startswith(".") and name.endswith(suffix):
            rel = posixpath.relpath(info.path, loc.path)
            out.append(loc.join(rel))
    return sorted(out, key=lambda loc: loc.path)


# ------------------------------------------------------------------ Parquet tables
def append_table(base: Location, table_name: str, table: pa.Table, part: str | None = None) -> Location:
    """Append rows to table ``table_name`` under ``base`` by writing one new Parquet file.

    Files are ``<base>/<table_name>/<part>.parquet``; earlier files are never rewritten.
    Tables named in :data:`TABLES` are checked and cast to their fixed schema; the schema
    version is stored in the file metadata.
    """
    if table_name in TABLES:
        table = conform(table_name, table)
    meta = dict(table.schema.metadata or {})
    meta[b"noah_ray_schema_version"] = str(SCHEMA_VERSION).encode()
    table = table.replace_schema_metadata(meta)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    target = base.join(table_name, f"{part or uuid.uuid4().hex}.parquet")
    write_bytes(target, buf.getvalue())
    return target


def read_table(base: Location, table_name: str) -> pa.Table | None:
    """All rows of ``table_name`` under ``base`` (None when nothing was written yet); files of
    older schema versions are upgraded to the current one."""
    files = list_files(base.join(table_name), ".parquet")
    if not files:
        return None
    tables = []
    for f in files:
        t = pq.read_table(io.BytesIO(read_bytes(f)))
        version = int((t.schema.metadata or {}).get(b"noah_ray_schema_version", b"0"))
        if version > SCHEMA_VERSION:
            raise ConfigError(f"{f.uri}: schema version {version} is newer than this noah_ray "
                              f"({SCHEMA_VERSION}); upgrade noah_ray")
        tables.append(upgrade(table_name, t.replace_schema_metadata(None), version))
    return pa.concat_tables(tables, promote_options="default")


# ------------------------------------------------------------------ checksums
#: the manifest beside the files of a checkpoint folder, ``final/`` or ``best/``: the sha256 and
#: size of each, written after them (a folder whose manifest is missing was written before
#: checksums existed, or is incomplete)
MANIFEST = "checksums.json"


@dataclass(frozen=True)
class Checked:
    """Files read by :func:`read_checked`; ``verified`` is False for a folder without a manifest
    (written before checksums: accepted unverified)."""

    files: dict[str, bytes]
    verified: bool


def write_checked(loc: Location, files: dict[str, bytes], manifest: str = MANIFEST) -> None:
    """Write ``files`` (name -> bytes) into folder ``loc``, then their manifest ``manifest``."""
    import hashlib
    import json

    for name, data in files.items():
        write_bytes(loc.join(name), data)
    entries = {name: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)} for name, data in files.items()}
    write_text(loc.join(manifest), json.dumps({"format": 1, "files": entries}, indent=1, sort_keys=True))


def read_checked(loc: Location, names: list[str], manifest: str = MANIFEST, recover: str = "write it again") -> Checked:
    """Read ``names`` from folder ``loc``, each checked against the manifest beside them.  A file
    that is missing, not listed or whose bytes differ raises one :class:`ConfigError` naming it
    and ``recover``; without a manifest the files are returned unverified."""
    import hashlib
    import json

    man = loc.join(manifest)
    try:
        listed = json.loads(read_text(man))["files"] if exists(man) else None
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"{man.uri} is truncated or corrupt; {recover}") from None
    files = {}
    for name in names:
        if not exists(loc.join(name)):
            raise ConfigError(f"{loc.join(name).uri} is missing (an incomplete write); {recover}")
        files[name] = data = read_bytes(loc.join(name))
        if listed is None:
            continue
        want = listed.get(name) if isinstance(listed, dict) else None
        if not isinstance(want, dict) or hashlib.sha256(data).hexdigest() != want.get("sha256"):
            why = f"not listed in {manifest}" if not isinstance(want, dict) else f"fails its checksum in {manifest}"
            raise ConfigError(f"{loc.join(name).uri} is truncated or corrupt ({why}); {recover}")
    return Checked(files, listed is not None)


# ------------------------------------------------------------------ checkpoints
def save_state(loc: Location, tensors: dict[str, Any], meta: dict[str, Any]) -> None:
    """Save tensors as ``<loc>/model.safetensors`` and ``meta`` as ``<loc>/meta.json``, then their
    checksums (:data:`MANIFEST`, :func:`write_checked`).

    A directory without ``meta.json`` is incomplete and ignored by :func:`load_state`.
    """
    import json

    from safetensors.torch import save

    write_checked(loc, {"model.safetensors": save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}),
                        "meta.json": json.dumps(meta, indent=1, sort_keys=True).encode()})


def load_state(loc: Location, recover: str = "write it again") -> tuple[dict[str, Any], dict[str, Any]]:
    """Inverse of :func:`save_state`: ``(tensors, meta)``.  A truncated or corrupt file, or one that
    fails its checksum, raises one :class:`ConfigError` naming it and ``recover`` (how to get a
    good one).  A folder written before checksums (no manifest) loads unverified."""
    import json

    from safetensors import SafetensorError
    from safetensors.torch import load

    meta_loc, weights = loc.join("meta.json"), loc.join("model.safetensors")
    if not exists(meta_loc):
        read_bytes(meta_loc)                          # the one-line "does not exist" error
    files = read_checked(loc, ["meta.json", "model.safetensors"], recover=recover).files
    try:
        meta = json.loads(files["meta.json"].decode())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{meta_loc.uri} is truncated or corrupt ({type(e).__name__}); {recover}") from None
    try:
        return load(files["model.safetensors"]), meta
    except (SafetensorError, ValueError) as e:
        raise ConfigError(f"{weights.uri} is truncated or corrupt ({str(e).splitlines()[0][:80]}); {recover}") from None
