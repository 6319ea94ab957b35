"""Transfer engines. Nothing in this package imports Celery (a test enforces it).

Layers, each module importing only modules of a lower rank (and config: references,
platforms, job models); tests/test_engine_layers.py holds the same table and checks
every module against it:

    0  errors, protocols, tls, local_coordinator, lanes
    1  retry, cache, throttle, keychain, challenges, results, docker_plan
    2  auth, docker_daemon
    3  transport
    4  manifests, blob_endpoints, tags
    5  blob_reader, prune
    6  ranges, blob_upload
    7  blobs
    8  copy
    9  referrers, plan
    10 registry, docker
"""
