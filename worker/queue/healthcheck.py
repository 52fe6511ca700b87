"""``python -m worker.queue.healthcheck``: exit 0 when this machine's worker answers a ping.

The health check of a worker container. The worker's Celery node must answer a ping sent
through the broker, to it alone, within the timeout: a worker that is up but no longer consumes
(its connection to the broker lost, its main process stuck) fails. The node is by default
``celery@`` and this host's name, which is what ``appattest worker`` calls itself without
``--hostname``. Settings come from the ``APPATTEST_*`` variables, like the worker's own. The
broker must deliver broadcasts, as Redis and RabbitMQ do (compose runs on Redis).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from celery.utils.nodenames import default_nodename
from kombu.exceptions import OperationalError

from worker.queue.app import create_celery_app
from worker.settings import load_settings


def main(argv: Sequence[str] | None = None) -> int:
    """Ping the node; return 0 when it answered, 1 otherwise (or when the broker is down)."""
    parser = argparse.ArgumentParser(
        prog="python -m worker.queue.healthcheck", description="Ping this machine's worker node."
    )
    parser.add_argument("--node", default=default_nodename(None), help="default: %(default)s")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds (default: 5)")
    args = parser.parse_args(argv)
    app = create_celery_app(load_settings())
    try:
        # One connection attempt, not the broker's retries: a check must answer in time.
        with app.connection_for_write(connect_timeout=args.timeout) as connection:
            connection.ensure_connection(
                max_retries=1, interval_start=0, interval_step=0, timeout=args.timeout
            )
            # With a destination, collecting replies ends as soon as that node answered.
            replies = app.control.ping(
                destination=[args.node], timeout=args.timeout, connection=connection
            )
    except (OperationalError, OSError) as exc:
        # The class name only: connection errors can carry the broker URL and its password.
        print(f"{args.node}: broker error {type(exc).__name__}", file=sys.stderr)
        return 1
    finally:
        app.close()
    if any(args.node in reply for reply in replies or []):
        print(f"{args.node}: ok")
        return 0
    print(f"{args.node}: no answer within {args.timeout:g} s", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
