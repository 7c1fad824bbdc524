"""The reference gateway's OpenAPI document: each route as its service answers it, then enveloped.

The bare document describes what each backend returns, in its own pagination
shape (not normalised); `envelope_openapi` then makes it what partners get.
"""

from __future__ import annotations

from typing import Any

from envelope_middleware.catalogue import Catalogue
from envelope_middleware.openapi import envelope_openapi
from envelope_middleware.request_id import RequestIdFormat

__all__ = ["EXCLUDED_PATHS", "gateway_openapi"]

# Outside the envelope: the health check, the document, and its page with the page's assets.
EXCLUDED_PATHS = ("/health", "/openapi.json", "/docs/")

_ID = {"type": "integer", "minimum": 1, "maximum": 1_000_000_000}
_ORDER = {
    "type": "object",
    "required": [
        "id",
        "brand_id",
        "branch_id",
        "channel",
        "status",
        "placed_at",
        "items",
        "total",
        "currency",
    ],
    "properties": {
        "id": {"type": "string"},
        "brand_id": {"type": "integer"},
        "branch_id": {"type": "integer"},
        "channel": {"type": "string"},
        "status": {"type": "string"},
        "placed_at": {"type": "string", "format": "date-time"},
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["item_id", "name", "quantity", "unit_price"],
                "properties": {
                    "item_id": {"type": "integer"},
                    "name": {"type": "string"},
                    "quantity": {"type": "integer"},
                    "unit_price": {"type": "integer"},
                },
            },
        },
        "total": {"type": "integer"},
        "currency": {"type": "string"},
    },
}
_BRANCH = {
    "type": "object",
    "required": ["id", "brand_id", "name", "city", "open"],
    "properties": {
        "id": {"type": "integer"},
        "brand_id": {"type": "integer"},
        "name": {"type": "string"},
        "city": {"type": "string"},
        "open": {"type": "boolean"},
    },
}
_BRAND = {
    "type": "object",
    "required": ["id", "name", "cuisine"],
    "properties": {"id": {"type": "integer"}, "name": {"type": "string"}, "cuisine": {"type": "string"}},
}
_ITEM = {
    "type": "object",
    "required": ["id", "brand_id", "name", "price", "status"],
    "properties": {
        "id": {"type": "integer"},
        "brand_id": {"type": "integer"},
        "name": {"type": "string"},
        "price": {"type": "integer"},
        "status": {"type": "string", "enum": ["available", "out_of_stock", "archived"]},
    },
}


def _page(items_key: str, item: str) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["page", "size", "total", items_key],
        "properties": {
            "page": {"type": "integer"},
            "size": {"type": "integer"},
            "total": {"type": "integer"},
            items_key: {"type": "array", "items": {"$ref": f"#/components/schemas/{item}"}},
        },
    }


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


_PAGING = [
    _query("page", {"type": "integer", "minimum": 1, "maximum": 100_000, "default": 1}, "The page, from 1."),
    _query("size", {"type": "integer", "minimum": 1, "maximum": 100, "default": 20}, "Items per page."),
]
_PAIRED = "brand_id and branch_id are passed together or omitted together (400 request_invalid)."


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _operation(
    operation_id: str, summary: str, scope: str, ok: dict[str, Any], **extra: Any
) -> dict[str, Any]:
    return {
        "operationId": operation_id,
        "summary": summary,
        "description": f"Needs a credential with the `{scope}` scope (403 auth_forbidden without it).",
        "security": [{"partnerBasic": []}],
        "x-required-scope": scope,
        "responses": {"200": ok},
        **extra,
    }


def _bare_document() -> dict[str, Any]:
    order_id = {
        "name": "order_id",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
    }
    item_id = {
        "name": "item_id",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "pattern": "^[0-9]{1,12}$"},
    }
    key = {
        "name": "Idempotency-Key",
        "in": "header",
        "required": True,
        "schema": {"type": "string", "pattern": "^[\\x21-\\x7e]{1,64}$"},
        "description": "One per logical write: the same key and body within 24 hours replay the first.",
    }
    return {
        # 3.0: the Swagger UI that /docs serves from an installed package (4.x) reads 3.0 only.
        "openapi": "3.0.3",
        "info": {
            "title": "Partner API (reference gateway)",
            "version": "1.0.0",
            "description": "Each list keeps its service's shape: data.orders, data.results, data[0].brands.",
        },
        "paths": {
            "/orders": {
                "get": _operation(
                    "list_orders",
                    "Orders, a page at a time (items under data.orders)",
                    "orders:read",
                    _json("A page of orders.", _page("orders", "Order")),
                    parameters=[
                        *_PAGING,
                        _query("brand_id", _ID, _PAIRED),
                        _query("branch_id", _ID, _PAIRED),
                    ],
                )
            },
            "/orders/{order_id}": {
                "get": _operation(
                    "get_order",
                    "One order",
                    "orders:read",
                    _json("The order.", {"$ref": "#/components/schemas/Order"}),
                    parameters=[order_id],
                )
            },
            "/branches": {
                "get": _operation(
                    "list_branches",
                    "Branches (items under data.results)",
                    "brands:read",
                    _json("A page of branches.", _page("results", "Branch")),
                    parameters=[*_PAGING, _query("brand_id", _ID, "Only this brand's branches.")],
                )
            },
            "/brands": {
                "get": _operation(
                    "list_brands",
                    "Brands (legacy shape: items under data[0].brands)",
                    "brands:read",
                    _json(
                        "A page of brands, in an outer array.",
                        {"type": "array", "items": _page("brands", "Brand")},
                    ),
                    parameters=_PAGING,
                )
            },
            "/items/{item_id}/availability": {
                "patch": _operation(
                    "set_item_availability",
                    "Mark a menu item available or out of stock",
                    "menus:oos",
                    _json("The item as it now is.", {"$ref": "#/components/schemas/Item"}),
                    parameters=[item_id, key],
                    requestBody={
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["available"],
                                    "properties": {"available": {"type": "boolean"}},
                                }
                            }
                        },
                    },
                )
            },
        },
        "components": {
            "securitySchemes": {
                "partnerBasic": {
                    "type": "http",
                    "scheme": "basic",
                    "description": "partner_key:secret_key; each credential has scopes.",
                }
            },
            "schemas": {"Order": _ORDER, "Branch": _BRANCH, "Brand": _BRAND, "Item": _ITEM},
        },
    }


# Beyond 4XX and 5XX, the statuses each route answers, by the codes that give them.
_OPERATION_CODES = {
    "list_orders": ["request_invalid", "auth_missing", "auth_forbidden", "request_invalid_range"],
    # The demo's deliberately failing records answer these: ord_crash 500,
    # ord_garbled 502, ord_slow 504.
    "get_order": [
        "auth_missing",
        "auth_forbidden",
        "resource_not_found",
        "internal",
        "downstream_invalid_response",
        "downstream_timeout",
    ],
    "list_branches": ["request_invalid", "auth_missing", "auth_forbidden"],
    "list_brands": ["request_invalid", "auth_missing", "auth_forbidden"],
    "set_item_availability": [
        "request_invalid",
        "request_missing_idempotency_key",
        "auth_missing",
        "auth_forbidden",
        "resource_unmapped",
        "idempotency_key_conflict",
        "state_invalid_transition",
        "service_unavailable",
    ],
}


def gateway_openapi(catalogue: Catalogue, request_id_format: RequestIdFormat) -> dict[str, Any]:
    """The gateway's document as partners receive it: enveloped with the gateway's own options."""
    return envelope_openapi(
        _bare_document(),
        catalogue=catalogue,
        request_id_format=request_id_format,
        exclude_paths=EXCLUDED_PATHS,
        operation_codes=_OPERATION_CODES,
    )
