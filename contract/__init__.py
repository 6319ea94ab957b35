"""What the producer and the workers agree on: queue and task names, the broker settings, every
Redis key, one way to open a Redis client, and the batch records both sides read and write.

A package of its own because both sides import it: the producer must not import ``workers``, and
``config`` holds no I/O while the batch store talks to Redis. It imports only ``config`` (and
redis); nothing here imports Celery, so the engine and cluster packages may use it.
"""
