"""ferry workers: Celery tasks on top of the transfer engines in ``workers.engine``."""
