"""Print the producer's commands as a person sees them, for the README: ``python -m tests.support.showcase``.

Real registries, Redis and a worker on this machine; a list with two good images, a tag that does
not exist, and an image on a registry that is down until ``retry``. Each command runs in a 120x35
pseudo-terminal; of the live bar's redraws only the last frame is kept, as a terminal shows it.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from tests.support.cluster import Cluster
from tests.support.images import Pusher, push_image
from tests.support.procs import port_open, wait_until
from tests.support.redis import RedisServer
from tests.support.registry import Registry
from tests.support.terminal import Terminal
from tests.support.workers import ferry_env

COLUMNS, ROWS = 120, 35
MB = 1000 * 1000


def _port(wanted: int) -> int:
    return 0 if port_open(wanted) else wanted  # 0: any free port


def _screen(term: Terminal) -> str:
    """The final frame: printed lines in order, the bar's last redraw where it stays."""
    lines = term.lines()
    bars = [i for i, ln in enumerate(lines) if ln.startswith("images ")]
    if not bars:
        return "\n".join(lines)
    last = lines[bars[-1]]
    kept = [ln for i, ln in enumerate(lines) if i not in bars and i < bars[-1]]
    return "\n".join([*kept, last, *lines[bars[-1] + 1:]])


def _run(c: Cluster, *args: str) -> Terminal:
    return Terminal.run(["-m", "producer", *args], c.env, columns=COLUMNS, rows=ROWS)


def _show(term: Terminal, command: str, timeout: float = 300) -> None:
    """``command``: as typed, with the list's and the batch's names rather than temporary paths."""
    term.wait(timeout)
    print(f"$ python -m producer {command}")
    print(_screen(term))
    print()


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="ferry-showcase-"))
    regs = [Registry(tmp / n, port=_port(p)) for n, p in (("src", 5901), ("down", 5998), ("dst", 5900))]
    redis = RedisServer(tmp / "redis")
    c: Cluster | None = None
    try:
        src, down, dst = (r.start() for r in regs)
        redis.start()
        pushers = [Pusher(src.url), Pusher(down.url)]
        push_image(pushers[0], "apps/api", layers=3, layer_size=4 * MB)
        push_image(pushers[0], "apps/web", layers=2, layer_size=2 * MB, archs=("amd64", "arm64"))
        push_image(pushers[0], "apps/worker", layers=1)
        push_image(pushers[1], "tools/cli", layers=1, layer_size=3 * MB)
        for p in pushers:
            p.client.close()
        down.stop()
        # One task retry, so the dead registry's image fails in seconds rather than minutes.
        c = Cluster(redis, tmp, ferry_env(redis.url, tmp, FERRY_TASK_MAX_RETRIES="1"))
        c.start_worker("node-1", concurrency=4)
        listing = c.listing([f"{src.host}/apps/api:v1", f"{src.host}/apps/web:v1",
                             f"{src.host}/apps/worker:v9.9", f"{down.host}/tools/cli:v1"])
        target = f"{dst.host}/mirror"

        run = _run(c, "enqueue", str(listing), "--target", target, "--wait")
        wait_until(lambda: run.first_seen(r"retrying line 4 \(attempt") is not None, 60, "the retry")
        batch = c.latest_batch()
        status = _run(c, "status", batch)  # while line 4 waits for its next attempt
        _show(run, f"enqueue images.txt --target {target} --wait")
        _show(status, f"status {batch}")
        down.start()
        time.sleep(1)
        _show(_run(c, "retry", batch, "--wait"), f"retry {batch} --wait")
        _show(_run(c, "report", batch), f"report {batch}")
        _show(_run(c, "batches"), "batches")
    finally:
        if c is not None:
            c.stop()
        redis.stop()
        for r in regs:
            r.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
