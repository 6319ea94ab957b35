"""Default values shared by the settings and the engine, each written once.

``config.settings`` offers them as ``FERRY_*`` defaults; engine classes use them when built
without settings (tests, library use). Plain numbers, no I/O.
"""

from __future__ import annotations

# Retries of one registry operation (transport layer): attempts, then full-jitter backoff
# from base_delay doubling up to max_delay seconds.
RETRY_ATTEMPTS = 6
RETRY_BASE_DELAY = 0.5
RETRY_MAX_DELAY = 30.0

# Per registry request: seconds to connect, and seconds without a byte before a read is a stall.
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 60.0

# Blobs of one image in flight at once, and the size of one upload chunk.
BLOB_CONCURRENCY = 6
CHUNK_SIZE = 64 * 1024**2
# Source blobs of at least RANGE_THRESHOLD bytes come as RANGE_PARALLEL Range requests at once.
RANGE_PARALLEL = 4
RANGE_THRESHOLD = 16 * 1024**2

# Node blob cache policy (BuildKit's GC names); keep_duration also ages the docker engine's prunes.
CACHE_KEEP_DURATION = 3600
CACHE_KEEP_BYTES = 10 * 1024**3
CACHE_MIN_FREE_BYTES = 2 * 1024**3
CACHE_MAX_PARALLELISM = 4

# Cluster coordination: how long a blob stays in the ledger unseen, how long a dead holder's
# lease lasts, and the RateLimit-Remaining under which a registry is paused.
LEDGER_TTL = 24 * 3600
LEASE_TTL = 30.0
QUOTA_FLOOR = 1
