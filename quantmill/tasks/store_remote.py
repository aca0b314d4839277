"""The remote half of a shared stage store: the same layout as a local one, in an S3 bucket.

`<url>/<stage>/<key>/` holds an entry's files and its manifest, uploaded last and only if no
manifest is there yet (S3's conditional `If-None-Match: *`), so an entry exists only once it is
complete, and a second writer never replaces the first one's. The manifest lists the entry's files
with their sizes (`store_files`); a download is checked against it (sizes, not hashes: hashing
a 100 GB checkpoint twice costs minutes; botocore adds a CRC32 to each upload and checks it on
download where the server returns one). Leases for building an entry live under
`<url>/.leases/` (quantmill/tasks/lease.py).

The store reaches S3 through s3fs; the endpoint and credentials come from the standard AWS
variables (AWS_ENDPOINT_URL or AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY),
which the installed botocore honours, so a MinIO or moto endpoint needs no quantmill setting.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantmill.core.errors import QuantmillError
from quantmill.core.hashing import sha256_text
from quantmill.tasks.lease import DEFAULT_LEASE_S, S3Lease

MANIFEST = "manifest.json"
FILES = "store_files"  # the manifest's {relative path: size} of the entry's files
LEASES = ".leases"
SCHEMES = ("s3",)


class RemoteStoreError(QuantmillError):
    """A remote store that cannot be reached, read or written: names the URL and the cause."""


def is_remote(home: str) -> bool:
    """`s3://...` (any `scheme://` but file://) is remote; a path or a file:// URL is local."""
    return "://" in home and not home.startswith("file://")


def local_path(home: str) -> Path:
    return Path(home[len("file://") :] if home.startswith("file://") else home).expanduser()


def cache_root(url: str) -> Path:
    """The local read-through cache of a remote store: `$QUANTMILL_CACHE/<hash of the URL>`
    (default ~/.cache/quantmill/remote/...), one folder per URL so two stores never mix."""
    parent = Path(os.environ.get("QUANTMILL_CACHE", Path.home() / ".cache" / "quantmill" / "remote")).expanduser()
    return parent / sha256_text(url.rstrip("/"))[:16]


def files_of(folder: Path, skip: str = MANIFEST) -> dict[str, int]:
    """{relative path: size} of the regular files under `folder` (but the manifest)."""
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file() and p.name != skip}


def _first_line(err: BaseException) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0]


@dataclass
class RemoteEntry:
    stage: str
    key: str
    size: int
    modified: float


class RemoteStore:
    """An s3:// store root; the filesystem is made on first use (listing the CLI stays cheap)."""

    def __init__(self, url: str) -> None:
        scheme = url.split("://", 1)[0]
        if scheme not in SCHEMES:
            raise RemoteStoreError(f"QUANTMILL_HOME {url}: a remote store must be s3://BUCKET[/PREFIX] (or use a local or mounted shared path)")
        self.url = url.rstrip("/")
        self.base = self.url.split("://", 1)[1]
        self._fs: Any = None
        self._bucket_ok = False

    @property
    def fs(self) -> Any:
        if self._fs is None:
            import fsspec

            # No listings cache: a manifest or lease written by another host must be seen at once.
            self._fs = fsspec.filesystem("s3", use_listings_cache=False)
        return self._fs

    def _path(self, stage: str, key: str, rel: str = "") -> str:
        return f"{self.base}/{stage}/{key}" + (f"/{rel}" if rel else "")

    def manifest(self, stage: str, key: str) -> bytes | None:
        """The entry's manifest as stored, or None when there is no entry (yet)."""
        try:
            return self.fs.cat_file(self._path(stage, key, MANIFEST))
        except FileNotFoundError:
            self._check_bucket()  # before a stage is computed for nothing
            return None
        except Exception as err:  # credentials, endpoint: one line naming the store
            raise RemoteStoreError(f"the store {self.url} cannot be read: {_first_line(err)}") from None

    def check(self) -> None:
        """The bucket exists and these credentials reach it, or a one-line RemoteStoreError: run
        before the first task, so a wrong bucket fails when the run is asked for."""
        self._check_bucket()

    def _check_bucket(self) -> None:
        """s3fs says "not found" alike for a missing key and a missing bucket: tell them apart once."""
        if self._bucket_ok:
            return
        bucket = self.base.split("/", 1)[0]
        try:
            self.fs.call_s3("head_bucket", Bucket=bucket)
        except Exception as err:
            raise RemoteStoreError(f"the store {self.url}: bucket {bucket} cannot be used ({_first_line(err)}): create it, or check the credentials") from None
        self._bucket_ok = True

    def download(self, stage: str, key: str, files: dict[str, int], dest: Path) -> None:
        """The entry's files into `dest`, each checked against the size the manifest lists."""
        for rel, size in files.items():
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                self.fs.get_file(self._path(stage, key, rel), str(target))
            except Exception as err:
                raise RemoteStoreError(f"the store {self.url}: downloading {stage}/{key[:12]}/{rel} failed: {_first_line(err)}") from None
            got = target.stat().st_size
            if got != size:
                raise RemoteStoreError(f"the store {self.url}: {stage}/{key[:12]}/{rel} has {got} bytes, its manifest says {size}: delete the entry and re-run")

    def publish(self, folder: Path, stage: str, key: str) -> bool:
        """Upload a built entry, its manifest last. False when the store already had the entry
        (then ours is dropped, as a local commit drops a slower writer's)."""
        if self.manifest(stage, key) is not None:
            return False
        try:
            for rel in files_of(folder):
                self.fs.put_file(str(folder / rel), self._path(stage, key, rel))
            self.put_manifest(stage, key, (folder / MANIFEST).read_bytes())
        except FileExistsError:
            return False
        except Exception as err:
            raise RemoteStoreError(f"the store {self.url}: uploading {stage}/{key[:12]} failed: {_first_line(err)}") from None
        return True

    def put_manifest(self, stage: str, key: str, data: bytes) -> None:
        """Create the manifest, the entry's last write; FileExistsError if another writer's is there."""
        self.fs.pipe_file(self._path(stage, key, MANIFEST), data, mode="create")

    def entries(self) -> Iterator[RemoteEntry]:
        """Every entry (a manifest inside) with its size and newest modification time."""
        self._check_bucket()
        try:
            found = self.fs.find(self.base, detail=True)
        except FileNotFoundError:
            return
        except Exception as err:
            raise RemoteStoreError(f"the store {self.url} cannot be listed: {_first_line(err)}") from None
        folders: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for name, info in found.items():
            parts = name[len(self.base) :].strip("/").split("/")
            if len(parts) >= 3 and not parts[0].startswith("."):
                folders.setdefault((parts[0], parts[1]), []).append({"rel": "/".join(parts[2:]), **info})
        for (stage, key), infos in sorted(folders.items()):
            if any(i["rel"] == MANIFEST for i in infos):
                modified = max((i["LastModified"].timestamp() for i in infos if i.get("LastModified")), default=0.0)
                yield RemoteEntry(stage, key, sum(int(i.get("size") or 0) for i in infos), modified)

    def lease(self, stage: str, key: str, lease_s: float = DEFAULT_LEASE_S) -> S3Lease:
        return S3Lease(self.fs, f"{self.base}/{LEASES}/{stage}/{key}.json", lease_s)


def manifest_files(data: bytes, where: str) -> tuple[dict[str, Any], dict[str, int]]:
    """A remote manifest -> (the manifest, its file list); one-line error if it is not one."""
    try:
        manifest = json.loads(data)
        files = manifest[FILES]
        if not isinstance(files, dict):
            raise ValueError(f"{FILES} is not an object")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise RemoteStoreError(f"{where} has a corrupt {MANIFEST} ({_first_line(err)}): delete it and re-run") from None
    return manifest, {str(k): int(v) for k, v in files.items()}
