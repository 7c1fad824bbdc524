"""The demo backend services: three ASGI apps with three conventions.

They stand for the internal services a partner gateway forwards to, and
differ as real services do: in where a list's items live, and in how they
fail. None of them knows about the envelope.

* orders:   `{"page", "size", "total", "orders": [...]}`; errors `{"detail": "..."}`
            (FastAPI style); a few poison orders misbehave on purpose.
* branches: `{"page", "size", "total", "results": [...]}`; errors `{"error": {"code", "message"}}`.
* brands:   the legacy outer array `[{"page", "size", "total", "brands": [...]}]`, and menu
            items; errors `{"error": {...}}` and RFC 9457 problem+json. `GET /writes` counts
            the availability changes it applied, for the exactly-once tests and the soak.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from envelope_middleware.demo.data import DemoData, generate, page_of

__all__ = ["SLOW_SECONDS", "create_backends"]

SLOW_SECONDS = 3.0


def _json(content: Any, status: int = 200, media_type: str = "application/json") -> Response:
    return Response(orjson.dumps(content), status_code=status, media_type=media_type)


def _paging(request: Request) -> tuple[int, int]:
    # The gateway validates paging before forwarding; backends only clamp.
    page = max(1, int(request.query_params.get("page", "1")))
    size = min(100, max(1, int(request.query_params.get("size", "20"))))
    return page, size


def _orders_app(data: DemoData) -> Starlette:
    by_id = {order["id"]: order for order in data.orders}

    async def list_orders(request: Request) -> Response:
        page, size = _paging(request)
        rows = data.orders
        if "brand_id" in request.query_params:
            brand_id = int(request.query_params["brand_id"])
            branch_id = int(request.query_params["branch_id"])
            rows = [o for o in rows if o["brand_id"] == brand_id and o["branch_id"] == branch_id]
        return _json({"page": page, "size": size, "total": len(rows), "orders": page_of(rows, page, size)})

    async def get_order(request: Request) -> Response:
        order_id = request.path_params["order_id"]
        if order_id == "ord_crash":
            trace = (
                "Traceback (most recent call last):\n"
                '  File "/srv/orders/app.py", line 88, in get_order\n'
                "psycopg.OperationalError: connection to orders-db-2.internal:5432 refused\n"
            )
            return PlainTextResponse(trace, status_code=500)
        if order_id == "ord_slow":
            await asyncio.sleep(SLOW_SECONDS)
        if order_id == "ord_garbled":
            return Response(b'{"id": "ord_garbled", "items": [{"item_id": 4,', media_type="application/json")
        order = by_id.get(order_id)
        if order is None:
            return JSONResponse({"detail": f"Order {order_id} not found"}, status_code=404)
        return _json(order)

    return Starlette(routes=[Route("/orders", list_orders), Route("/orders/{order_id}", get_order)])


def _branches_app(data: DemoData) -> Starlette:
    async def list_branches(request: Request) -> Response:
        page, size = _paging(request)
        rows = data.branches
        if "brand_id" in request.query_params:
            rows = [b for b in rows if b["brand_id"] == int(request.query_params["brand_id"])]
            if not rows:
                error = {"code": "resource_not_found", "message": "No branches for this brand"}
                return _json({"error": error}, status=404)
        return _json({"page": page, "size": size, "total": len(rows), "results": page_of(rows, page, size)})

    return Starlette(routes=[Route("/branches", list_branches)])


def _brands_app(data: DemoData) -> Starlette:
    async def list_brands(request: Request) -> Response:
        page, size = _paging(request)
        rows = data.brands
        return _json([{"page": page, "size": size, "total": len(rows), "brands": page_of(rows, page, size)}])

    async def item_availability(request: Request) -> Response:
        item = data.items.get(int(request.path_params["item_id"]))
        if item is None:
            problem = {
                "type": "https://docs.example.com/problems/item-not-found",
                "title": "Item not found",
                "status": 404,
                "detail": f"No menu item {request.path_params['item_id']}",
            }
            return _json(problem, status=404, media_type="application/problem+json")
        change = orjson.loads(await request.body())
        if item["status"] == "archived":
            error = {
                "code": "state_invalid_transition",
                "message": "An archived item cannot change availability",
                "details": {"item_id": item["id"], "from": "archived"},
            }
            return _json({"error": error}, status=422)
        item["status"] = "available" if change["available"] else "out_of_stock"
        data.writes_executed += 1
        return _json(item)

    async def writes(_request: Request) -> Response:
        return _json({"executed": data.writes_executed})

    return Starlette(
        routes=[
            Route("/brands", list_brands),
            Route("/items/{item_id:int}/availability", item_availability, methods=["PATCH"]),
            Route("/writes", writes),
        ]
    )


def create_backends(data: DemoData | None = None) -> dict[str, Starlette]:
    """The three demo services by name, sharing one generated data set."""
    data = data if data is not None else generate()
    return {"orders": _orders_app(data), "branches": _branches_app(data), "brands": _brands_app(data)}
