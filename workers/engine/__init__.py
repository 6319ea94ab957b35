"""Transfer engines. Nothing in this package imports Celery (a test enforces it).

Layers, each importing only those before it:
reference (config.reference) -> errors -> auth -> transport/retry -> manifests/blobs -> copy -> engines.
"""
