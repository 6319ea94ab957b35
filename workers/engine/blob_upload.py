"""Pushing one blob's bytes into one repository through a registry upload session.

The POST comes first (it earns the push token before any streamed body), then the bytes
in PATCH chunks, then ``PUT ?digest=`` only once the reader verified size and digest, so
a corrupt source is never committed. After a failure the next attempt asks the registry
how much the session holds and goes on from there, or opens a new session. A registry
that refuses chunks gets the whole blob in one PUT.
"""

from __future__ import annotations

import logging
from typing import Any

from config.reference import Reference
from workers.engine.blob_endpoints import cancel_upload, commit_upload, send_chunk, start_upload, upload_status
from workers.engine.blob_reader import BlobReader
from workers.engine.errors import RegistryError, TransportError, UnsupportedMediaType
from workers.engine.manifests import Descriptor
from workers.engine.protocols import ProgressFn
from workers.engine.transport import RegistryTransport

log = logging.getLogger(__name__)


class UploadSession:
    """One upload of ``desc`` to ``dst``, read from ``reader``; ``run`` once."""

    def __init__(self, transport: RegistryTransport, dst: Reference, desc: Descriptor, reader: BlobReader,
                 chunk_size: int, progress: ProgressFn | None) -> None:
        self._transport = transport
        self._dst = dst
        self._desc = desc
        self._reader = reader
        self._chunk_size = chunk_size
        self._progress = progress
        self._location: str | None = None  # the open session's URL
        self._mark: tuple[int, Any] | None = None  # the reader where the current chunk began
        self._monolithic = False

    def run(self) -> int:
        """The bytes uploaded. Retried by the transport's policy; a session left open by a
        failure is cancelled."""
        try:
            return self._transport.retry.call(
                self._attempt, what=f"upload of {self._desc.digest} to {self._dst.name}")
        except BaseException:
            if self._location is not None:
                cancel_upload(self._transport, self._dst, self._location)
            raise

    def _start(self) -> None:
        self._location = start_upload(self._transport, self._dst)
        self._reader.rewind_to_start()
        self._mark = self._reader.mark()

    def _resync(self) -> None:
        """After a failure: continue where the registry's upload session says it is."""
        assert self._location is not None and self._mark is not None
        reader = self._reader
        end = upload_status(self._transport, self._dst, self._location)
        if end is not None and not self._monolithic:
            have = end + 1
            # distribution reports an empty upload as 0-0, the same as one byte.
            if end == 0 and reader.offset == 0:
                have = 0
            if have == reader.offset:
                self._mark = reader.mark()
                return
            if have == self._mark[0]:
                reader.rewind(self._mark)
                return
        cancel_upload(self._transport, self._dst, self._location)
        self._location = None
        self._start()

    def _attempt(self) -> int:
        reader, desc = self._reader, self._desc
        if self._location is None:
            self._start()
        else:
            self._resync()
        assert self._location is not None
        if self._monolithic:
            return self._put_whole()
        start = reader.offset
        while reader.offset < desc.size:
            self._mark = reader.mark()
            n = min(self._chunk_size, desc.size - reader.offset)
            try:
                self._location, end = send_chunk(self._transport, self._dst, self._location,
                                                 reader.pieces(n, self._progress))
            except RegistryError as exc:
                if exc.status in (405, 501) or isinstance(exc, UnsupportedMediaType):
                    # This registry takes uploads in one PUT only.
                    log.info("%s refuses chunked uploads; sending %s in one request",
                             self._dst.api_host, desc.digest)
                    self._monolithic = True
                    self._location = None
                    self._start()
                    return self._put_whole()
                raise
            if end is not None and end + 1 != reader.offset and not (end == 0 and reader.offset == 0):
                raise TransportError(f"registry holds {end + 1} bytes of the upload, {reader.offset} were sent")
            if reader.error is not None:
                raise reader.error
        reader.verify()
        commit_upload(self._transport, self._dst, self._location, desc.digest)
        self._location = None
        return reader.offset - start

    def _put_whole(self) -> int:
        assert self._location is not None
        reader, size = self._reader, self._desc.size
        reader.rewind_to_start()
        body = reader.pieces(size, self._progress, hold_last=True) if size else iter(())
        if not size:
            reader.verify()
        commit_upload(self._transport, self._dst, self._location, self._desc.digest, body)
        self._location = None
        return size
