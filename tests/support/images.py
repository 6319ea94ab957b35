"""Generate valid images (layers, configs, manifests, indexes) straight into a test registry."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer(seed: str, size: int) -> tuple[bytes, str]:
    """A gzip'd tar with one file of ``size`` pseudo-random bytes; returns (blob, diff_id)."""
    payload = random.Random(seed).randbytes(size)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo(f"f/{hashlib.sha256(seed.encode()).hexdigest()[:12]}")
        info.size, info.mtime, info.mode = size, 0, 0o644
        tf.addfile(info, io.BytesIO(payload))
    tar = buf.getvalue()
    return gzip.compress(tar, compresslevel=1, mtime=0), sha(tar)


@dataclass
class Pusher:
    """Pushes blobs and manifests with plain HTTP; counts what it wrote."""

    base_url: str
    client: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=60))

    def __enter__(self) -> Pusher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.close()

    def blob(self, repo: str, data: bytes) -> str:
        d = sha(data)
        if self.client.head(f"{self.base_url}/v2/{repo}/blobs/{d}").status_code == 200:
            return d
        r = self.client.post(f"{self.base_url}/v2/{repo}/blobs/uploads/")
        r.raise_for_status()
        loc = r.headers["Location"]
        if loc.startswith("/"):
            loc = self.base_url + loc
        r = self.client.put(httpx.URL(loc).copy_merge_params({"digest": d}), content=data,
                            headers={"Content-Type": "application/octet-stream"})
        r.raise_for_status()
        return d

    def manifest(self, repo: str, ref: str, body: bytes, media_type: str) -> str:
        r = self.client.put(f"{self.base_url}/v2/{repo}/manifests/{ref}", content=body,
                            headers={"Content-Type": media_type})
        r.raise_for_status()
        return sha(body)


def push_random_blob(base_url: str, repo: str, size: int, seed: int) -> str:
    """Stream ``size`` pseudo-random bytes into ``repo`` without holding them; returns the digest."""
    hasher = hashlib.sha256()
    rng = random.Random(seed)

    def body() -> Iterator[bytes]:
        left = size
        while left:
            piece = rng.randbytes(min(left, 1 << 20))
            hasher.update(piece)
            left -= len(piece)
            yield piece

    with httpx.Client(base_url=base_url, timeout=60) as c:
        loc = c.post(f"/v2/{repo}/blobs/uploads/").headers["Location"]
        loc = c.patch(loc, content=body()).headers["Location"]
        digest = "sha256:" + hasher.hexdigest()
        c.put(httpx.URL(loc).copy_merge_params({"digest": digest})).raise_for_status()
    return digest


@dataclass
class Image:
    repo: str
    tag: str
    digest: str
    media_type: str
    blobs: list[str]
    size: int


def push_image(
    pusher: Pusher,
    repo: str,
    tag: str = "v1",
    *,
    layers: int = 2,
    layer_size: int = 64 * 1024,
    base: int = 0,
    archs: tuple[str, ...] = ("amd64",),
    oci: bool = True,
    salt: str = "s0",
    extra_index_entries: list[dict[str, object]] | None = None,
) -> Image:
    """Push an image (an index when several archs are given) and tag it."""
    m_type, c_type, l_type = (OCI_MANIFEST, OCI_CONFIG, OCI_LAYER) if oci else (
        DOCKER_MANIFEST, DOCKER_CONFIG, DOCKER_LAYER)
    entries: list[dict[str, object]] = []
    all_blobs: list[str] = []
    total = 0
    bodies: list[tuple[bytes, str]] = []
    for arch in archs:
        descs, diff_ids = [], []
        for i in range(layers):
            seed = f"base-{arch}-{i}-{layer_size}" if i < base else f"{salt}-{repo}-{tag}-{arch}-{i}"
            blob, diff = layer(seed, layer_size)
            descs.append({"mediaType": l_type, "digest": pusher.blob(repo, blob), "size": len(blob)})
            diff_ids.append(diff)
            total += len(blob)
        cfg = json.dumps({"architecture": arch, "os": "linux", "config": {},
                          "rootfs": {"type": "layers", "diff_ids": diff_ids}}, sort_keys=True).encode()
        cdesc = {"mediaType": c_type, "digest": pusher.blob(repo, cfg), "size": len(cfg)}
        all_blobs += [cdesc["digest"], *(d["digest"] for d in descs)]  # type: ignore[list-item]
        man = json.dumps({"schemaVersion": 2, "mediaType": m_type, "config": cdesc, "layers": descs},
                         indent=2).encode()
        bodies.append((man, arch))
    if len(archs) == 1 and not extra_index_entries:
        man = bodies[0][0]
        d = pusher.manifest(repo, tag, man, m_type)
        return Image(repo, tag, d, m_type, all_blobs, total)
    for man, arch in bodies:
        d = pusher.manifest(repo, sha(man), man, m_type)
        entries.append({"mediaType": m_type, "digest": d, "size": len(man),
                        "platform": {"architecture": arch, "os": "linux"}})
    entries += extra_index_entries or []
    i_type = OCI_INDEX if oci else DOCKER_LIST
    idx = json.dumps({"schemaVersion": 2, "mediaType": i_type, "manifests": entries}, indent=2).encode()
    d = pusher.manifest(repo, tag, idx, i_type)
    return Image(repo, tag, d, i_type, all_blobs, total)
