"""Signatures, attestations and SBOMs built the way cosign and ORAS store them, pushed into a test registry."""

from __future__ import annotations

import json
from dataclasses import dataclass

from tests.support.images import OCI_INDEX, OCI_MANIFEST, Pusher, sha

EMPTY_CONFIG = "application/vnd.oci.empty.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
COSIGN_SIGNATURE = "application/vnd.dev.cosign.simplesigning.v1+json"
DSSE_ENVELOPE = "application/vnd.dsse.envelope.v1+json"
SPDX = "application/spdx+json"


@dataclass(frozen=True)
class Artifact:
    repo: str
    digest: str
    size: int
    artifact_type: str
    # The tag it was pushed under (cosign's convention), or None for a by-digest referrer.
    tag: str | None = None

    def descriptor(self) -> dict[str, object]:
        return {"mediaType": OCI_MANIFEST, "digest": self.digest, "size": self.size,
                "artifactType": self.artifact_type}


def schema_tag(digest: str) -> str:
    return digest.replace(":", "-", 1)


def _push(pusher: Pusher, repo: str, ref: str | None, config: bytes, config_type: str, payload: bytes,
          layer_type: str, *, artifact_type: str | None = None, subject: dict[str, object] | None = None,
          annotations: dict[str, str] | None = None) -> Artifact:
    layer: dict[str, object] = {"mediaType": layer_type, "digest": pusher.blob(repo, payload), "size": len(payload)}
    if annotations:
        layer["annotations"] = annotations
    doc: dict[str, object] = {"schemaVersion": 2, "mediaType": OCI_MANIFEST}
    if artifact_type:
        doc["artifactType"] = artifact_type
    doc["config"] = {"mediaType": config_type, "digest": pusher.blob(repo, config), "size": len(config)}
    doc["layers"] = [layer]
    if subject:
        doc["subject"] = subject
    raw = json.dumps(doc, indent=2).encode()
    digest = pusher.manifest(repo, ref or sha(raw), raw, OCI_MANIFEST)
    return Artifact(repo, digest, len(raw), artifact_type or config_type, ref)


def cosign_signature(pusher: Pusher, repo: str, subject: str, note: str = "") -> Artifact:
    """What ``cosign sign`` writes: a simplesigning payload under ``sha256-<hex>.sig``."""
    payload = json.dumps({"critical": {"image": {"docker-manifest-digest": subject},
                                       "type": "cosign container image signature"},
                          "optional": {"note": note}}).encode()
    config = json.dumps({"architecture": "", "os": "", "rootfs": {"type": "layers", "diff_ids": [sha(payload)]},
                         "config": {}}).encode()
    return _push(pusher, repo, schema_tag(subject) + ".sig", config, OCI_CONFIG, payload, COSIGN_SIGNATURE,
                 annotations={"dev.cosignproject.cosign/signature": "MEUCIQ" + note})


def cosign_attestation(pusher: Pusher, repo: str, subject: str) -> Artifact:
    """What ``cosign attest`` writes: a DSSE envelope under ``sha256-<hex>.att``."""
    payload = json.dumps({"payloadType": "application/vnd.in-toto+json", "payload": "e30=",
                          "signatures": [{"sig": "MEQCIA"}], "subject": subject}).encode()
    config = json.dumps({"architecture": "", "os": "", "config": {},
                         "rootfs": {"type": "layers", "diff_ids": [sha(payload)]}}).encode()
    return _push(pusher, repo, schema_tag(subject) + ".att", config, OCI_CONFIG, payload, DSSE_ENVELOPE,
                 annotations={"predicateType": "https://slsa.dev/provenance/v0.2"})


def cosign_sbom(pusher: Pusher, repo: str, subject: str) -> Artifact:
    """What ``cosign attach sbom`` writes: the SBOM itself under ``sha256-<hex>.sbom``."""
    payload = json.dumps({"spdxVersion": "SPDX-2.3", "name": f"sbom of {subject}"}).encode()
    return _push(pusher, repo, schema_tag(subject) + ".sbom", b"{}", EMPTY_CONFIG, payload, SPDX)


def referrer(pusher: Pusher, repo: str, subject: str, subject_size: int, artifact_type: str, text: str,
             subject_type: str = OCI_MANIFEST) -> Artifact:
    """An OCI 1.1 referrer (what ``oras attach`` writes): an artifact whose ``subject`` is the image."""
    return _push(pusher, repo, None, b"{}", EMPTY_CONFIG, text.encode(), artifact_type, artifact_type=artifact_type,
                 subject={"mediaType": subject_type, "digest": subject, "size": subject_size})


def tag_schema_index(pusher: Pusher, repo: str, subject: str, referrers: list[Artifact]) -> str:
    """The referrers tag schema index a client writes where the registry lacks the API."""
    raw = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX,
                      "manifests": [a.descriptor() for a in referrers]}, indent=2).encode()
    return pusher.manifest(repo, schema_tag(subject), raw, OCI_INDEX)
