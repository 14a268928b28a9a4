"""``p3s cancel`` and ``p3s pilots stop|drain``: the operator's orders, from the command line.

The database side and the orders to pilots are :mod:`p3s.dispatcher.cancel`'s
(the web service calls the same functions); here are only the arguments and
what is printed.
"""

from __future__ import annotations

import argparse
from typing import Any

EXIT_OK = 0
EXIT_FAILURE = 1


def _publish(args: argparse.Namespace, controls: list[Any]) -> None:
    from p3s.cli import settings_of
    from p3s.dispatcher import cancel

    cancel.send(settings_of(args), controls)


def cmd_cancel(args: argparse.Namespace) -> int:
    from p3s.cli import session_of, settings_of
    from p3s.dispatcher import cancel

    session = session_of(args)
    try:
        result = cancel.cancel_and_tell(session, settings_of(args), args.what, args.id)
    finally:
        session.get_bind().dispose()
    for line in result.lines():
        print(line)
    return EXIT_OK


def cmd_pilots_order(args: argparse.Namespace) -> int:
    from p3s.cli import session_of
    from p3s.dispatcher import cancel

    action = "stop_now" if getattr(args, "now", False) else args.order
    session = session_of(args)
    try:
        with session:
            orders, gone = cancel.pilot_orders(session, action, pilot_id=args.id, host=args.host)
    finally:
        session.get_bind().dispose()
    _publish(args, orders)
    told = {"drain": "drain: no new task, exit after the current job",
            "stop": "stop: no new task, exit after the current job",
            "stop_now": "stop now: end the payload, report its job, exit"}[action]
    for order in orders:
        print(f"pilot {order.pilot_id}: told to {told}")
    for line in gone:
        print(line)
    return EXIT_OK


def add_commands(sub: Any) -> None:
    """``cancel workflow|job ID``; ``stop`` and ``drain`` under the existing ``pilots`` listing."""
    cancel = sub.add_parser(
        "cancel", help="drop a workflow's or a job's pending and queued jobs; pilots end the running ones"
    ).add_subparsers(dest="what", required=True, metavar="WHAT")
    for what, help in (("workflow", "every job of the workflow"), ("job", "the job and its descendants")):
        q = cancel.add_parser(what, help=f"cancel {help}")
        q.add_argument("id", type=int, metavar="ID")
        q.set_defaults(func=cmd_cancel)

    pilots = sub.choices["pilots"]
    orders = pilots.add_subparsers(dest="order", metavar="ORDER", required=False)
    for order, help in (
        ("stop", "tell pilots to stop: after their current job, or at once with --now"),
        ("drain", "tell pilots to take no new task and exit after their current job"),
    ):
        q = orders.add_parser(order, help=help, description=help + " (over the broker; only alive pilots)")
        who = q.add_mutually_exclusive_group(required=True)
        who.add_argument("--id", default=None, help="the pilot of this id")
        who.add_argument("--host", default=None, help="every alive pilot on this host")
        if order == "stop":
            q.add_argument("--now", action="store_true",
                           help="kill the running payload's processes, report its job dropped, exit")
        q.set_defaults(func=cmd_pilots_order)
