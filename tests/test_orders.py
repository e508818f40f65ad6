"""The shop's second half end to end: orders (a saga over inventory and payments), events through a
real NATS JetStream to notifications and inventory, the outbox, recovery after a SIGKILL, and
faults switched at run time — every process real, requests through the gateway like a user's."""

import asyncio
import json
import os
import re
import secrets
import signal
import threading
import time

import pytest
import requests

from conftest import Collector, wait_until
from shop import Shop

OK_CARD = "4242 4242 4242 4242"
DECLINED_CARD = "4000000000000002"


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("orders")
    collector = Collector(tmp / "collector.db").start()
    s = Shop(tmp, collector, catalogs=1, orders=True).start()
    yield s
    s.stop()
    collector.stop(signal.SIGKILL)


@pytest.fixture(autouse=True)
def no_faults_left(shop):
    yield
    requests.delete(f"{shop.registry.url}/v1/faults", timeout=10)
    requests.put(f"{shop.registry.url}/v1/chaos", json={"enabled": False}, timeout=10)


def login(shop):
    email = f"buyer-{secrets.token_hex(4)}@example.com"
    r = shop.api("POST", "/api/users/register", json={"email": email, "password": "correct horse", "name": "Buyer"})
    assert r.status_code == 201, r.text
    r = shop.api("POST", "/api/users/login", json={"email": email, "password": "correct horse"})
    assert r.status_code == 200, r.text
    return {"Authorization": f"Bearer {r.json()['accessToken']}"}


def place(shop, auth, items, card=OK_CARD, **kw):
    body = {"items": [{"productId": p, "quantity": q} for p, q in items], "card": {"number": card}}
    return shop.api("POST", "/api/orders", json=body, headers=auth, **kw)


def stock(shop, product):
    r = requests.get(f"{shop.inventory.url}/stock/{product}", timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def messages(shop, order_id):
    r = requests.get(f"{shop.notifications.url}/messages", params={"orderId": order_id}, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["items"]


def charges(shop, order_id):
    r = requests.get(f"{shop.payments.url}/charges", params={"orderId": order_id}, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["charges"]


def reservation(shop, order_id):
    r = requests.get(f"{shop.inventory.url}/reservations/{order_id}", timeout=10)
    return r.json() if r.status_code == 200 else None


def set_fault(shop, service, kind, **body):
    r = requests.put(f"{shop.registry.url}/v1/faults/{service}/{kind}", json=body, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def clear_fault(shop, service, kind):
    r = requests.delete(f"{shop.registry.url}/v1/faults/{service}/{kind}", timeout=10)
    assert r.status_code in (204, 404), r.text


def fault_changes(proc):
    return [l for l in proc.log if "faults in force changed" in l]


def fault_seen(proc, service, kind):
    """Waits until `proc` knows of the fault (its log says so): the registry's watch reached it."""
    wait_until(lambda: f"{service}:{kind}" in "".join(fault_changes(proc)[-1:]), timeout=15, what=f"{proc.name} seeing {service}:{kind}")


def fault_gone(proc, service, kind):
    wait_until(lambda: f"{service}:{kind}" not in "".join(fault_changes(proc)[-1:]), timeout=15, what=f"{proc.name} dropping {service}:{kind}")


def trace(collector, trace_id, check, what):
    def fetch():
        r = collector.get(f"/api/v1/traces/{trace_id}")
        if r.status_code != 200:
            return None
        t = r.json()
        return t if check(t["spans"]) else None
    return wait_until(fetch, timeout=30, what=what)


def attr(span, key):
    for a in span["attributes"]:
        if a["key"] == key:
            return next(iter(a["value"].values()))
    return None


def named(spans, service, name):
    return [s for s in spans if s["service"] == service and s["name"] == name]


def trace_id_of(resp):
    return resp.headers["traceparent"].split("-")[1]


def test_an_order_crosses_every_service_and_its_events_reach_the_consumers(shop):
    auth = login(shop)
    before = stock(shop, "p-1001")
    r = place(shop, auth, [("p-1001", 2), ("p-1003", 1), ("p-1001", 1)])
    assert r.status_code == 201, r.text
    order = r.json()
    assert order["status"] == "CONFIRMED" and order["failureReason"] is None
    assert order["totalCents"] == 3 * 3990 + 3450 and order["currency"] == "EUR" and order["cardLast4"] == "4242"
    assert [(i["productId"], i["quantity"], i["unitPriceCents"]) for i in order["items"]] == [("p-1001", 3, 3990), ("p-1003", 1, 3450)]
    assert [s["step"] for s in order["steps"]] == ["place", "reserve", "charge", "confirm"]

    # One trace: gateway → orders → catalog (prices), inventory (gRPC), payments (REST); the events
    # go through NATS to notifications and inventory, whose consumer spans link to the producer's.
    tid = trace_id_of(r)

    def complete(spans):
        wanted = [("notifications", "process orders.confirmed"), ("inventory", "process orders.confirmed"), ("notifications", "process orders.placed"),
                  ("payments", "POST /charges"), ("inventory", "switchyard.inventory.v1.Inventory/Reserve"), ("gateway", "POST /api/orders"),
                  ("catalog", "switchyard.catalog.v1.Catalog/GetProduct"), ("orders", "publish orders.confirmed")]
        return all(named(spans, svc, name) for svc, name in wanted)
    spans = trace(shop.collector, tid, complete, "the order's trace with its consumers")["spans"]
    by_id = {s["spanId"]: s for s in spans}
    g = named(spans, "gateway", "POST /api/orders")[0]
    o = named(spans, "orders", "POST /orders")[0]
    assert by_id[o["parentSpanId"]]["service"] == "gateway" and by_id[by_id[o["parentSpanId"]]["parentSpanId"]] == g
    reserve = named(spans, "inventory", "switchyard.inventory.v1.Inventory/Reserve")[0]
    assert by_id[reserve["parentSpanId"]]["service"] == "orders" and by_id[reserve["parentSpanId"]]["kind"] == "client"
    charge = named(spans, "payments", "POST /charges")[0]
    assert by_id[charge["parentSpanId"]]["service"] == "orders"
    assert named(spans, "catalog", "switchyard.catalog.v1.Catalog/GetProduct")
    producer = named(spans, "orders", "publish orders.confirmed")[0]
    assert producer["kind"] == "producer"
    assert attr(producer, "messaging.system") == "nats" and attr(producer, "messaging.destination.name") == "orders.confirmed"
    assert attr(producer, "messaging.operation.type") == "send"
    for service in ("notifications", "inventory"):
        consumer = named(spans, service, "process orders.confirmed")[0]
        assert consumer["kind"] == "consumer" and attr(consumer, "messaging.operation.type") == "process"
        assert consumer["parentSpanId"] == producer["spanId"]
        assert [(l["traceId"], l["spanId"]) for l in consumer["links"]] == [(tid, producer["spanId"])]
        assert attr(consumer, "messaging.consumer.group.name") == service

    # The aggregated view, the caller's list, and what the events did.
    def committed():
        v = shop.api("GET", f"/api/orders/{order['id']}", headers=auth).json()
        return v if v["reservation"] and v["reservation"]["state"] == "COMMITTED" else None
    view = wait_until(committed, what="the reservation committed by the OrderConfirmed event")
    assert view["order"]["status"] == "CONFIRMED" and view["partial"] is False
    assert view["payment"]["status"] == "CAPTURED" and view["payment"]["charges"][0]["amountCents"] == order["totalCents"]
    assert {(i["productId"], i["quantity"]) for i in view["reservation"]["items"]} == {("p-1001", 3), ("p-1003", 1)}
    listed = shop.api("GET", "/api/orders", headers=auth).json()["items"]
    assert [o["id"] for o in listed] == [order["id"]]
    after = stock(shop, "p-1001")
    assert (after["available"], after["reserved"]) == (before["available"] - 3, before["reserved"])
    sent = wait_until(lambda: len(messages(shop, order["id"])) == 2 and messages(shop, order["id"]), what="two notifications")
    assert sorted(m["eventType"] for m in sent) == ["OrderConfirmed", "OrderPlaced"]
    assert all(m["userId"] == order["userId"] for m in sent)

    # Someone else's order is not theirs to see.
    other = login(shop)
    assert shop.api("GET", f"/api/orders/{order['id']}", headers=other).status_code == 404
    assert shop.api("GET", "/api/orders", headers=other).json()["items"] == []

    # The service map draws the broker between producer and consumers.
    def mapped():
        m = shop.collector.api("/api/v1/service-map")
        edges = {(e["source"], e["target"]) for e in m["edges"]}
        return m if {("orders", "nats orders.{event}"), ("nats orders.{event}", "notifications"), ("nats orders.{event}", "inventory")} <= edges else None
    m = wait_until(mapped, what="the broker on the service map")
    assert next(n for n in m["nodes"] if n["id"] == "nats orders.{event}")["kind"] == "broker"
    edges = {(e["source"], e["target"]) for e in m["edges"]}
    assert ("orders", "notifications") not in edges and ("gateway", "orders") in edges and ("orders", "payments") in edges


def test_a_declined_card_or_missing_stock_fails_the_order_with_nothing_held_or_charged(shop):
    auth = login(shop)
    before = stock(shop, "p-1005")
    r = place(shop, auth, [("p-1005", 2)], card=DECLINED_CARD)
    assert r.status_code == 201, r.text
    order = r.json()
    assert order["status"] == "FAILED" and "payment declined: card declined" in order["failureReason"]
    assert [(s["step"], s["outcome"]) for s in order["steps"]] == [("place", "ok"), ("reserve", "ok"), ("charge", "failed"), ("compensate", "ok")]
    assert stock(shop, "p-1005") == before
    assert [c["status"] for c in charges(shop, order["id"])] == ["DECLINED"]
    assert reservation(shop, order["id"])["state"] == "RELEASED"
    failed = wait_until(lambda: [m for m in messages(shop, order["id"]) if m["eventType"] == "OrderFailed"], what="the failure notice")
    assert "declined" in failed[0]["body"]

    # Sold out by design: nothing is reserved or charged at all.
    before = stock(shop, "p-1001")
    r = place(shop, auth, [("p-1001", 1), ("p-1016", 1)])
    assert r.status_code == 201 and r.json()["status"] == "FAILED", r.text
    assert "out of stock: p-1016 (asked 1, available 0)" in r.json()["failureReason"]
    assert charges(shop, r.json()["id"]) == []
    assert reservation(shop, r.json()["id"])["items"] == [], "only the release is on record"
    assert stock(shop, "p-1001") == before


def test_charges_and_refunds_are_idempotent(shop):
    url = f"{shop.payments.url}"
    order = f"ord_test_{secrets.token_hex(4)}"
    body = {"orderId": order, "amountCents": 1234, "currency": "EUR", "card": {"number": "4242424242424242"}}
    key = {"Idempotency-Key": f"k-{order}"}
    answers = []
    threads = [threading.Thread(target=lambda: answers.append(requests.post(f"{url}/charges", json=body, headers=key, timeout=10))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {a.status_code for a in answers} == {201}
    assert len({a.json()["id"] for a in answers}) == 1, "every repeat answers the first charge"
    assert [c["status"] for c in charges(shop, order)] == ["CAPTURED"]
    again = requests.post(f"{url}/charges", json={**body, "amountCents": 999}, headers=key, timeout=10)
    assert again.status_code == 409 and again.json()["error"]["field"] == "Idempotency-Key"
    other_key = requests.post(f"{url}/charges", json=body, headers={"Idempotency-Key": "another"}, timeout=10)
    assert other_key.status_code == 409 and "already charged" in other_key.json()["error"]["message"]
    refunds = [requests.post(f"{url}/refunds", json={"orderId": order}, headers={"Idempotency-Key": f"r-{order}"}, timeout=10) for _ in range(2)]
    assert refunds[0].json() == refunds[1].json() and refunds[0].json()["status"] == "REFUNDED"
    assert [c["status"] for c in charges(shop, order)] == ["REFUNDED"]
    # A refund before any charge voids the order: a late charge cannot go through.
    late = f"ord_late_{secrets.token_hex(4)}"
    v = requests.post(f"{url}/refunds", json={"orderId": late}, headers={"Idempotency-Key": f"r-{late}"}, timeout=10)
    assert v.json()["status"] == "VOIDED"
    c = requests.post(f"{url}/charges", json={**body, "orderId": late}, headers={"Idempotency-Key": f"c-{late}"}, timeout=10)
    assert c.status_code == 409 and "voided" in c.json()["error"]["message"]


def test_with_notifications_stopped_orders_succeed_and_every_event_applies_once_after(shop):
    auth = login(shop)
    assert shop.notifications.stop() == 0
    ids = []
    for _ in range(3):
        r = place(shop, auth, [("p-1010", 1)])
        assert r.status_code == 201 and r.json()["status"] == "CONFIRMED", r.text
        ids.append(r.json()["id"])
    shop.notifications.start()
    for i in ids:
        got = wait_until(lambda: len(messages(shop, i)) >= 2 and messages(shop, i), what=f"notifications of {i}")
        assert sorted(m["eventType"] for m in got) == ["OrderConfirmed", "OrderPlaced"]

    # A copy of an event (same id, delivered again under another message id) changes nothing.
    first = messages(shop, ids[0])[0]
    event = {"eventId": first["eventId"], "type": first["eventType"], "orderId": ids[0], "userId": first["userId"], "status": "CONFIRMED",
             "totalCents": 1, "currency": "EUR", "items": [], "reason": None, "occurredAt": "2026-12-01T00:00:00Z"}

    async def republish():
        import nats
        nc = await nats.connect(shop.nats.url)
        js = nc.jetstream()
        await js.publish("orders.confirmed" if first["eventType"] == "OrderConfirmed" else "orders.placed", json.dumps(event).encode(),
                         headers={"Nats-Msg-Id": f"copy-{secrets.token_hex(4)}"})
        await nc.close()
    asyncio.run(republish())

    def duplicate_counted():
        m = re.search(r"^notifications_duplicate_events_total (\d+)", requests.get(f"{shop.notifications.url}/metrics", timeout=10).text, re.M)
        return m and int(m.group(1)) >= 1
    wait_until(duplicate_counted, what="the duplicate noticed")
    assert len(messages(shop, ids[0])) == 2


def test_with_the_broker_down_orders_succeed_and_the_outbox_drains_when_it_is_back(shop):
    auth = login(shop)
    shop.nats.stop()
    ids = []
    for _ in range(2):
        r = place(shop, auth, [("p-1011", 1)])
        assert r.status_code == 201 and r.json()["status"] == "CONFIRMED", r.text
        ids.append(r.json()["id"])
    outbox = requests.get(f"{shop.orders.url}/outbox", timeout=10).json()
    assert outbox["pending"] >= 4, outbox
    wait_until(lambda: requests.get(f"{shop.orders.url}/outbox", timeout=10).json()["lastError"], what="a failed publish recorded")
    assert all(reservation(shop, i)["state"] == "RESERVED" for i in ids), "not committed while the events wait"

    shop.nats.start()
    wait_until(lambda: requests.get(f"{shop.orders.url}/outbox", timeout=10).json()["pending"] == 0, timeout=60, what="the outbox drained")
    for i in ids:
        wait_until(lambda: len(messages(shop, i)) == 2, timeout=30, what=f"notifications of {i}")
        wait_until(lambda: reservation(shop, i)["state"] == "COMMITTED", what=f"{i} committed")


def test_an_orders_instance_killed_mid_saga_is_finished_by_another(shop):
    auth = login(shop)
    product = "p-1012"
    before = stock(shop, product)
    set_fault(shop, "payments", "latency", value=1500)
    fault_seen(shop.payments, "payments", "latency")
    placed = []
    t = threading.Thread(target=lambda: placed.append(place(shop, auth, [(product, 2)])))
    t.start()
    # The charge is on its way (stock held); the orchestrator dies.
    wait_until(lambda: stock(shop, product)["reserved"] == before["reserved"] + 2, what="stock reserved")
    victim = shop.orders
    victim.stop(signal.SIGKILL)
    t.join()
    assert placed[0].status_code in (502, 503, 504), placed[0].text
    clear_fault(shop, "payments", "latency")

    shop.orders = shop.start_orders("orders-2")
    def settled():
        items = shop.api("GET", "/api/orders", headers=auth).json().get("items", [])
        return items if items and items[0]["status"] in ("CONFIRMED", "FAILED") else None
    [order] = wait_until(settled, timeout=60, what="the saga finished by the other instance")
    view = shop.api("GET", f"/api/orders/{order['id']}", headers=auth).json()
    assert "recover" in [s["step"] for s in view["order"]["steps"]]
    captured = [c for c in charges(shop, order["id"]) if c["status"] == "CAPTURED"]
    if order["status"] == "CONFIRMED":
        assert len(captured) == 1
        wait_until(lambda: reservation(shop, order["id"])["state"] == "COMMITTED", what="committed")
        assert stock(shop, product)["available"] == before["available"] - 2
    else:
        assert captured == []
        assert stock(shop, product) == before
    assert stock(shop, product)["reserved"] == before["reserved"], "nothing stays reserved"


def test_with_payments_unreachable_the_breaker_opens_and_closes_after(shop):
    auth = login(shop)
    before = stock(shop, "p-1013")
    set_fault(shop, "payments", "unreachable")
    fault_seen(shop.orders, "payments", "unreachable")

    def circuit():
        m = re.search(r'^orders_circuit_state\{service="payments"\} (\d)', requests.get(f"{shop.orders.url}/metrics", timeout=10).text, re.M)
        return int(m.group(1)) if m else None
    # An order whose charge cannot be made waits in COMPENSATING, its stock already given back,
    # until payments can confirm that nothing was charged (the refund voids the order there).
    waiting = []
    for _ in range(8):  # charge and refund attempts fail: five in a row open the circuit
        r = place(shop, auth, [("p-1013", 1)])
        assert r.status_code == 202 and r.json()["status"] == "COMPENSATING", r.text
        assert r.json()["failureReason"].startswith("payments unavailable"), r.text
        waiting.append(r.json()["id"])
        if circuit() == 1:
            break
    assert circuit() == 1
    r = place(shop, auth, [("p-1013", 1)])
    assert "circuit for payments is open" in r.json()["failureReason"]
    waiting.append(r.json()["id"])
    assert stock(shop, "p-1013") == before, "every order waiting for payments gave its stock back"
    # The rest of the shop is unaffected.
    assert shop.api("GET", "/api/catalog/products/p-1001").status_code == 200
    assert shop.api("GET", "/api/orders", headers=auth).status_code == 200

    clear_fault(shop, "payments", "unreachable")
    fault_gone(shop.orders, "payments", "unreachable")

    def closed():
        r = place(shop, auth, [("p-1013", 1)])
        return r.json()["status"] == "CONFIRMED" and circuit() == 0
    # Half-open after 5 s; three calls that get through close it.
    wait_until(closed, timeout=30, interval=0.2, what="orders confirmed and the circuit closed")
    # Recovery finishes the waiting orders: FAILED, voided at payments, never charged.
    for i in waiting:
        wait_until(lambda: shop.api("GET", f"/api/orders/{i}", headers=auth).json()["order"]["status"] == "FAILED", timeout=30,
                   what=f"{i} compensated")
        assert [c["status"] for c in charges(shop, i)] == ["VOIDED"]


def test_bad_input_to_every_new_route_is_a_json_4xx_naming_the_field(shop):
    auth = login(shop)
    cases = [
        ({"items": [], "card": {"number": OK_CARD}}, "items"),
        ({"items": [{"productId": "p-1001", "quantity": 0}], "card": {"number": OK_CARD}}, "items[0].quantity"),
        ({"items": [{"productId": "p-1001", "quantity": 1}, {"productId": "", "quantity": 1}], "card": {"number": OK_CARD}}, "items[1].productId"),
        ({"items": [{"productId": "p-9999", "quantity": 1}], "card": {"number": OK_CARD}}, "items[0].productId"),
        ({"items": [{"productId": "p-1001", "quantity": 1}], "card": {"number": "1234"}}, "card.number"),
        ({"items": [{"productId": "p-1001", "quantity": 1}]}, "card"),
        ({"items": [{"productId": "p-1001", "quantity": "two"}], "card": {"number": OK_CARD}}, "items[0].quantity"),
    ]
    for body, field in cases:
        r = shop.api("POST", "/api/orders", json=body, headers=auth)
        assert r.status_code == 400 and r.json()["error"]["field"] == field, (body, r.text)
    r = shop.api("POST", "/api/orders", data="{nope", headers={**auth, "Content-Type": "application/json"})
    assert r.status_code == 400 and "invalid JSON body" in r.json()["error"]["message"]
    assert shop.api("POST", "/api/orders", json=cases[0][0]).status_code == 401, "a token is needed"
    assert shop.api("GET", "/api/orders").status_code == 401
    assert shop.api("GET", "/api/orders/ord_x").status_code == 401
    for params, field in [({"limit": "0"}, "limit"), ({"status": "LOST"}, "status"), ({"sort": "x"}, "sort")]:
        r = shop.api("GET", "/api/orders", params=params, headers=auth)
        assert r.status_code == 400 and r.json()["error"]["field"] == field, r.text
    r = shop.api("GET", "/api/orders/not%20an%20id", headers=auth)
    assert r.status_code == 400 and r.json()["error"]["field"] == "id"
    r = shop.api("GET", "/api/orders/ord_nothing", headers=auth)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    for path in ["/api/payments/charges", "/api/inventory/stock"]:
        r = shop.api("GET", path, headers=auth)
        assert r.status_code == 404 and "internal" in r.json()["error"]["message"]
    r = shop.api("GET", "/api/notifications/messages", params={"limit": "many"}, headers=auth)
    assert r.status_code == 400 and r.json()["error"]["field"] == "limit"
    # Payments and the fault API, called directly.
    r = requests.post(f"{shop.payments.url}/charges", json={"orderId": "o1", "amountCents": 5, "currency": "EUR", "card": {"number": OK_CARD}}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["field"] == "Idempotency-Key"
    r = requests.post(f"{shop.payments.url}/charges", json={"orderId": "o1", "amountCents": -5, "currency": "EUR", "card": {"number": OK_CARD}},
                      headers={"Idempotency-Key": "x"}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["field"] == "amountCents"
    reg = shop.registry.url
    for path, body, field in [("/v1/faults/orders/gremlins", {}, "kind"), ("/v1/faults/orders/latency", {"value": -1}, "value"),
                              ("/v1/faults/registry/registry_outage", {}, "durationSecs"), ("/v1/faults/catalog/payment_decline", {}, "service"),
                              ("/v1/faults/orders/latency", {"value": "fast"}, "value"), ("/v1/faults/orders/latency", {"durationSecs": 0}, "durationSecs")]:
        r = requests.put(f"{reg}{path}", json=body, timeout=10)
        assert r.status_code == 400 and r.json()["error"]["field"] == field, (path, body, r.text)
    r = requests.put(f"{reg}/v1/chaos", json={"enabled": True, "intervalSecs": 0}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["field"] == "intervalSecs"
    assert requests.get(f"{reg}/v1/faults", timeout=10).json()["faults"] == []


def fault_trace(shop, resp, check, what):
    return trace(shop.collector, trace_id_of(resp), check, what)["spans"]


def test_request_faults_show_in_traces_and_go_away_when_switched_off(shop):
    # latency and cpu_burn: spans of their own, as long as the fault says.
    set_fault(shop, "catalog", "latency", value=300)
    set_fault(shop, "catalog", "cpu_burn", value=100)
    fault_seen(shop.catalogs[0], "catalog", "cpu_burn")
    r = shop.api("GET", "/api/catalog/categories")
    assert r.status_code == 200
    spans = fault_trace(shop, r, lambda s: named(s, "catalog", "fault cpu_burn"), "fault spans")
    lat, burn = named(spans, "catalog", "fault latency")[0], named(spans, "catalog", "fault cpu_burn")[0]
    assert attr(lat, "fault.name") == "latency" and int(lat["durationNanos"]) >= 300e6
    assert attr(burn, "fault.name") == "cpu_burn" and int(burn["durationNanos"]) >= 100e6
    server = named(spans, "catalog", "GET /categories")[0]
    assert {v["stringValue"] for v in attr(server, "fault.active")["values"]} == {"latency", "cpu_burn"}
    clear_fault(shop, "catalog", "latency")
    clear_fault(shop, "catalog", "cpu_burn")
    fault_gone(shop.catalogs[0], "catalog", "cpu_burn")
    r = shop.api("GET", "/api/catalog/categories")
    spans = fault_trace(shop, r, lambda s: named(s, "catalog", "GET /categories"), "a trace without faults")
    assert not [s for s in spans if s["name"].startswith("fault ")]

    # error_rate: an error status and an exception event naming the fault.
    set_fault(shop, "catalog", "error_rate", value=100)
    fault_seen(shop.catalogs[0], "catalog", "error_rate")
    r = shop.api("GET", "/api/catalog/categories")
    assert r.status_code == 500 and r.json()["error"]["code"] == "injected_fault"
    spans = fault_trace(shop, r, lambda s: named(s, "catalog", "GET /categories"), "the failed request")
    server = named(spans, "catalog", "GET /categories")[0]
    assert server["status"]["code"] == "ERROR" and attr(server, "fault.name") == "error_rate"
    assert [e["name"] for e in server["events"]] == ["exception"]
    clear_fault(shop, "catalog", "error_rate")
    fault_gone(shop.catalogs[0], "catalog", "error_rate")
    assert shop.api("GET", "/api/catalog/categories").status_code == 200

    # db_slow and db_error: on the database spans.
    set_fault(shop, "catalog", "db_slow", value=200)
    fault_seen(shop.catalogs[0], "catalog", "db_slow")
    r = shop.api("GET", "/api/catalog/products")
    spans = fault_trace(shop, r, lambda s: named(s, "catalog", "SELECT products"), "slow db spans")
    slow = named(spans, "catalog", "SELECT products")[0]
    assert attr(slow, "fault.name") == "db_slow" and int(slow["durationNanos"]) >= 200e6
    clear_fault(shop, "catalog", "db_slow")
    set_fault(shop, "catalog", "db_error", value=100)
    fault_seen(shop.catalogs[0], "catalog", "db_error")
    r = shop.api("GET", "/api/catalog/products")
    assert r.status_code == 500
    spans = fault_trace(shop, r, lambda s: named(s, "catalog", "SELECT products"), "failed db span")
    failed = named(spans, "catalog", "SELECT products")[0]
    assert failed["status"]["code"] == "ERROR" and attr(failed, "fault.name") == "db_error"
    clear_fault(shop, "catalog", "db_error")
    fault_gone(shop.catalogs[0], "catalog", "db_error")
    assert shop.api("GET", "/api/catalog/products").status_code == 200

    # rate_limit_storm at the gateway.
    set_fault(shop, "gateway", "rate_limit_storm", value=100)
    fault_seen(shop.gateway, "gateway", "rate_limit_storm")
    r = shop.api("GET", "/api/catalog/categories")
    assert r.status_code == 429 and r.headers["Retry-After"] == "1"
    clear_fault(shop, "gateway", "rate_limit_storm")
    fault_gone(shop.gateway, "gateway", "rate_limit_storm")
    assert shop.api("GET", "/api/catalog/categories").status_code == 200

    # unreachable: the callers cannot connect.
    set_fault(shop, "catalog", "unreachable")
    fault_seen(shop.gateway, "catalog", "unreachable")
    r = shop.api("GET", "/api/catalog/categories")
    assert r.status_code in (502, 503) and "unreachable" in r.json()["error"]["message"], r.text
    clear_fault(shop, "catalog", "unreachable")
    fault_gone(shop.gateway, "catalog", "unreachable")
    wait_until(lambda: shop.api("GET", "/api/catalog/categories").status_code == 200, timeout=30, interval=0.5, what="catalog reachable again")


def test_order_faults_show_what_they_are(shop):
    auth = login(shop)
    # payment_decline: the order fails, compensated.
    set_fault(shop, "payments", "payment_decline", value=100)
    fault_seen(shop.payments, "payments", "payment_decline")
    r = place(shop, auth, [("p-1020", 1)])
    assert r.json()["status"] == "FAILED" and "payment_decline" in r.json()["failureReason"]
    spans = fault_trace(shop, r, lambda s: named(s, "payments", "POST /charges"), "the declined charge")
    assert attr(named(spans, "payments", "POST /charges")[0], "fault.name") == "payment_decline"
    clear_fault(shop, "payments", "payment_decline")

    # publish_failure: orders still succeed; the events wait in the outbox, then go.
    set_fault(shop, "orders", "publish_failure", value=100)
    fault_seen(shop.orders, "orders", "publish_failure")
    r = place(shop, auth, [("p-1021", 1)])
    assert r.json()["status"] == "CONFIRMED"
    spans = fault_trace(shop, r, lambda s: named(s, "orders", "publish orders.placed"), "a failed publish")
    send = named(spans, "orders", "publish orders.placed")[0]
    assert send["status"]["code"] == "ERROR" and attr(send, "fault.name") == "publish_failure"
    assert requests.get(f"{shop.orders.url}/outbox", timeout=10).json()["pending"] >= 1
    clear_fault(shop, "orders", "publish_failure")
    wait_until(lambda: len(messages(shop, r.json()["id"])) == 2, timeout=30, what="the events published after the fault")

    # consumer_lag: the consumer span waits.
    set_fault(shop, "notifications", "consumer_lag", value=800)
    fault_seen(shop.notifications, "notifications", "consumer_lag")
    r = place(shop, auth, [("p-1022", 1)])
    spans = fault_trace(shop, r, lambda s: named(s, "notifications", "process orders.confirmed"), "a lagging consumer")
    lag = named(spans, "notifications", "process orders.confirmed")[0]
    assert attr(lag, "fault.name") == "consumer_lag" and int(lag["durationNanos"]) >= 800e6
    clear_fault(shop, "notifications", "consumer_lag")


def rss_mib(proc):
    with open(f"/proc/{proc.proc.pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1)) / 1024


def test_process_and_registry_faults(shop):
    # memory_growth: the process grows while it is on and gives the memory back after.
    start = rss_mib(shop.payments)
    set_fault(shop, "payments", "memory_growth", value=32)
    wait_until(lambda: rss_mib(shop.payments) > start + 64, timeout=30, what="payments growing")
    clear_fault(shop, "payments", "memory_growth")
    peak = rss_mib(shop.payments)
    wait_until(lambda: rss_mib(shop.payments) < peak - 48, timeout=30, what="memory given back")

    # lost_heartbeats: the lease runs out and the registry evicts the instance; it comes back after.
    nid = shop.notifications.instance_id
    set_fault(shop, "notifications", "lost_heartbeats")
    wait_until(lambda: nid not in {i["instanceId"] for i in shop.instances()}, timeout=30, what="the silent instance evicted")
    events = requests.get(f"{shop.registry.url}/v1/events", timeout=10).json()["events"]
    assert any(e["kind"] == "EVICTED" and e["instanceId"] == nid for e in events)
    clear_fault(shop, "notifications", "lost_heartbeats")
    wait_until(lambda: nid in {i["instanceId"] for i in shop.instances()}, timeout=30, what="the instance registered again")

    # registry_outage: 503 for a set time, the fault API still answers, nobody is evicted.
    before = {i["instanceId"] for i in shop.instances()}
    set_fault(shop, "registry", "registry_outage", durationSecs=2)
    r = requests.get(f"{shop.registry.url}/v1/services", timeout=10)
    assert r.status_code == 503 and "registry outage" in r.json()["error"]["message"] and int(r.headers["Retry-After"]) >= 1
    assert requests.get(f"{shop.registry.url}/v1/faults", timeout=10).json()["faults"][0]["kind"] == "registry_outage"
    assert shop.api("GET", "/api/catalog/categories").status_code == 200, "the gateway serves from its last view"
    wait_until(lambda: requests.get(f"{shop.registry.url}/v1/services", timeout=10).status_code == 200, timeout=15, what="the outage over")
    assert {i["instanceId"] for i in shop.instances()} == before

    # Chaos: random faults on a schedule, each marked as chaos's, and off again.
    r = requests.put(f"{shop.registry.url}/v1/chaos", json={"enabled": True, "intervalSecs": 1, "maxActive": 2}, timeout=10)
    assert r.status_code == 200 and r.json()["enabled"] is True
    chaos = wait_until(lambda: [f for f in requests.get(f"{shop.registry.url}/v1/faults", timeout=10).json()["faults"] if f["source"] == "chaos"],
                       what="a chaos fault")
    assert chaos[0]["expiresAt"] and chaos[0]["kind"] != "registry_outage"
    requests.put(f"{shop.registry.url}/v1/chaos", json={"enabled": False}, timeout=10)


def test_new_services_serve_promtool_clean_metrics(shop, tmp_path):
    import subprocess
    for proc in (shop.orders, shop.inventory, shop.payments, shop.notifications):
        text = requests.get(f"{proc.url}/metrics", timeout=10).text
        f = tmp_path / f"{proc.name}.prom"
        f.write_text(text)
        r = subprocess.run(["promtool", "check", "metrics"], stdin=open(f), capture_output=True, text=True)
        assert r.returncode == 0, (proc.name, r.stdout, r.stderr)
        assert "http_server_requests_total" in text
    assert "orders_outbox_pending" in requests.get(f"{shop.orders.url}/metrics", timeout=10).text


def test_users_memory_stays_bounded_under_concurrent_logins(shop):
    """argon2id takes 19 MiB per hash: a burst of logins must not keep that much per thread."""
    email = f"burst-{secrets.token_hex(4)}@example.com"
    assert shop.api("POST", "/api/users/register", json={"email": email, "password": "correct horse", "name": "B"}).status_code == 201
    statuses = []

    def logins():
        for _ in range(4):
            statuses.append(shop.api("POST", "/api/users/login", json={"email": email, "password": "correct horse"}, timeout=60).status_code)
    threads = [threading.Thread(target=logins) for _ in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(statuses) <= {200, 503} and statuses.count(200) >= 48, statuses
    rss = rss_mib(shop.users)
    assert rss < 160, f"users holds {rss:.0f} MiB after {len(statuses)} logins"


def test_every_service_answers_unknown_routes_and_methods_with_json_errors(shop):
    procs = {"users": (shop.users, "DELETE", "/login"), "catalog": (shop.catalogs[0], "POST", "/products"),
             "inventory": (shop.inventory, "POST", "/stock"), "payments": (shop.payments, "DELETE", "/charges"),
             "orders": (shop.orders, "DELETE", "/orders"), "notifications": (shop.notifications, "POST", "/messages"),
             "gateway": (shop.gateway, "DELETE", "/api/storefront"), "registry": (shop.registry, "DELETE", "/v1/status")}
    for name, (proc, method, path) in procs.items():
        r = requests.get(f"{proc.url}/no/such", timeout=10)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", (name, r.status_code, r.text)
        assert "/no/such" in r.json()["error"]["message"]
        r = requests.request(method, f"{proc.url}{path}", timeout=10)
        assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed", (name, r.status_code, r.text)
        assert method in r.json()["error"]["message"]
    # Through the gateway: catalog's gRPC routes no longer answer plain HTTP paths.
    r = shop.api("GET", "/api/catalog/no/such")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found" and "grpc-status" not in r.headers, r.text
    assert shop.api("GET", "/api/catalog/products/p-1001").status_code == 200, "the gRPC route still works"


def test_metric_labels_never_come_from_client_input(shop):
    auth = login(shop)
    for path in ["/api/reviews-9f2c/x", "/api/no-such-service"]:
        r = shop.api("GET", path, headers=auth)
        assert r.status_code == 503 and "is registered" in r.json()["error"]["message"], r.text
    r = shop.api("FROBNICATE", "/api/catalog/products", headers=auth)
    assert r.status_code in (404, 405), r.text
    metrics = shop.api("GET", "/metrics").text
    assert "reviews-9f2c" not in metrics and "no-such-service" not in metrics
    assert re.search(r'gateway_upstream_attempts_total\{outcome="no_instance",service="_unknown"\} [1-9]', metrics)
    assert "FROBNICATE" not in metrics and 'method="_OTHER"' in metrics
    assert "reviews-9f2c" not in shop.api("GET", "/admin/circuits").text, "no breaker for a made-up name"
