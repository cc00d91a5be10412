"""The example shop: a WSGI app whose ``pricing`` module is canaried per user.

``hotpatch.RoutingKeyMiddleware`` sets the user id from the ``X-User-Id`` header as the routing key
of the request, so every request of one user sees the same version of ``pricing`` for the whole
ramp (and, once on the new version, stays there). Works under any WSGI server: gunicorn
(``gunicorn app:application``) or the standard library's (``run.py``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

import pricing

import hotpatch

StartResponse = Callable[..., Any]


def shop(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    query = parse_qs(environ.get("QUERY_STRING", ""))
    sku = query.get("sku", ["book"])[0]
    try:
        qty = int(query.get("qty", ["1"])[0])
        body = {"sku": sku, "qty": qty, "price": pricing.price(sku, qty)}
        status = "200 OK"
    except (KeyError, ValueError) as exc:
        body = {"error": f"{type(exc).__name__}: {exc}"}
        status = "500 Internal Server Error"
    data = json.dumps(body).encode()
    start_response(
        status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
    )
    return [data]


application = hotpatch.RoutingKeyMiddleware(shop, header="X-User-Id")
