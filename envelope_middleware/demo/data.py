"""Deterministic, realistic demo data: brands, branches, menu items and orders."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

_BRAND_NAMES = [
    "Kopi Kenangan",
    "Sate Senayan",
    "Bakmi Naga",
    "Warung Tekko",
    "Soto Betawi H. Ma'ruf",
    "Ayam Geprek Bensu",
    "Martabak Orins",
    "Nasi Uduk Kebon Kacang",
    "Es Teler 77",
    "Bebek Kaleyo",
    "Roti Bakar 88",
    "Mie Gacoan",
    "Pempek Pak Raden",
    "Gado-Gado Boplo",
    "Seblak Jeletot",
    "Kwetiau Aciap",
    "Bubur Ayam Barito",
    "Rawon Setan",
    "Lontong Balap",
    "Tahu Sumedang",
    "Pisang Goreng Madu",
    "Sop Buntut Cut Meutia",
    "Ketoprak Ciragil",
    "Nasi Padang Sederhana",
]
_AREAS = [
    "Kemang",
    "Senopati",
    "Menteng",
    "Kelapa Gading",
    "Pluit",
    "Cikini",
    "Tebet",
    "Blok M",
    "Kuningan",
    "Sudirman",
    "Cilandak",
    "Pondok Indah",
    "Serpong",
    "Bintaro",
    "Depok",
    "Bekasi",
]
_DISHES = [
    "Nasi Goreng",
    "Mie Ayam",
    "Es Kopi Susu",
    "Sate Ayam",
    "Soto Ayam",
    "Rendang",
    "Gado-Gado",
    "Bakso",
    "Es Teh Manis",
    "Martabak Manis",
    "Ayam Bakar",
    "Tempe Mendoan",
    "Pisang Goreng",
    "Nasi Uduk",
    "Kwetiau Goreng",
    "Bubur Ayam",
    "Sop Buntut",
    "Es Jeruk",
    "Lontong Sayur",
]
_CHANNELS = ["gofood", "grabfood", "shopeefood", "direct"]
_STATUSES = ["pending", "accepted", "preparing", "ready", "delivered", "cancelled"]

# Orders whose backend misbehaves on purpose, so the demo shows each error path.
POISON_ORDERS = {
    "ord_crash": "a plain-text 500 with a stack trace",
    "ord_slow": "an answer slower than the gateway's timeout",
    "ord_garbled": "a 200 labelled JSON that is not JSON",
}
ARCHIVED_ITEM_EVERY = 13  # items whose id is a multiple of this are archived


@dataclass
class DemoData:
    brands: list[dict[str, Any]] = field(default_factory=list)
    branches: list[dict[str, Any]] = field(default_factory=list)
    items: dict[int, dict[str, Any]] = field(default_factory=dict)
    orders: list[dict[str, Any]] = field(default_factory=list)
    # Availability changes the brands service actually applied: what proves that a
    # retried keyed write ran once (issue #10).
    writes_executed: int = 0


def generate(seed: int = 7, *, orders: int = 600) -> DemoData:
    """The same data for the same seed: tests and curl examples can rely on it."""
    rng = random.Random(seed)
    data = DemoData()
    for brand_id, name in enumerate(_BRAND_NAMES, start=1):
        data.brands.append(
            {
                "id": brand_id,
                "name": name,
                "cuisine": rng.choice(["Indonesian", "Coffee", "Snacks", "Noodles"]),
            }
        )
    branch_id = 0
    for brand in data.brands:
        for area in rng.sample(_AREAS, k=rng.randint(1, 3)):
            branch_id += 1
            data.branches.append(
                {
                    "id": branch_id,
                    "brand_id": brand["id"],
                    "name": f"{brand['name']} {area}",
                    "city": "Jakarta"
                    if area not in ("Serpong", "Depok", "Bekasi", "Bintaro")
                    else "Greater Jakarta",
                    "open": rng.random() > 0.1,
                }
            )
    item_id = 0
    for brand in data.brands:
        for dish in rng.sample(_DISHES, k=6):
            item_id += 1
            archived = item_id % ARCHIVED_ITEM_EVERY == 0
            data.items[item_id] = {
                "id": item_id,
                "brand_id": brand["id"],
                "name": dish,
                "price": rng.randrange(8_000, 95_000, 500),
                "status": "archived" if archived else rng.choice(["available", "available", "out_of_stock"]),
            }
    start = datetime(2026, 11, 1, 8, 0, tzinfo=UTC)
    item_list = list(data.items.values())
    for number in range(1, orders + 1):
        branch = rng.choice(data.branches)
        lines = []
        for item in rng.sample(
            [i for i in item_list if i["brand_id"] == branch["brand_id"]], k=rng.randint(1, 4)
        ):
            quantity = rng.randint(1, 3)
            lines.append(
                {
                    "item_id": item["id"],
                    "name": item["name"],
                    "quantity": quantity,
                    "unit_price": item["price"],
                }
            )
        data.orders.append(
            {
                "id": f"ord_{number:05d}",
                "brand_id": branch["brand_id"],
                "branch_id": branch["id"],
                "channel": rng.choice(_CHANNELS),
                "status": rng.choice(_STATUSES),
                "placed_at": (start + timedelta(minutes=17 * number)).isoformat(),
                "items": lines,
                "total": sum(line["quantity"] * line["unit_price"] for line in lines),
                "currency": "IDR",
            }
        )
    return data


def page_of(rows: list[Any], page: int, size: int) -> list[Any]:
    return rows[(page - 1) * size : page * size]
