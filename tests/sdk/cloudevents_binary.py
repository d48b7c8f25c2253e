"""Reads Kafka records with the official CloudEvents Python SDK (2.x, binary content mode).

stdin: one JSON object per line, a record as the test consumed it:
    {"key": hex or null, "value": hex or null, "headers": [[name, hex value], ...]}
stdout: one JSON object per line, what the SDK made of it:
    {"ok": true, "attributes": {...}, "extensions": {...}, "data": ...}
    or {"ok": false, "error": "..."} when the SDK refuses the record.
`data` is the parsed JSON for a JSON content type, {"hex": ...} for bytes, null for no data.
"""
import json
import sys

from cloudevents.core.bindings.kafka import KafkaMessage, from_binary_event

CORE = ("id", "source", "type", "specversion", "subject", "time", "datacontenttype", "dataschema")


def unhex(h):
    return None if h is None else bytes.fromhex(h)


for line in sys.stdin:
    record = json.loads(line)
    message = KafkaMessage(
        headers={name: bytes.fromhex(value) for name, value in record["headers"]},
        key=unhex(record["key"]),
        # The SDK reads an empty or missing value as "no data" (the binding's tombstone).
        value=unhex(record["value"]) if record["value"] is not None else None,
    )
    try:
        event = from_binary_event(message)
    except Exception as e:  # the test prints what the SDK refused, and why
        print(json.dumps({"ok": False, "error": f"{type(e).__name__}: {e}"}))
        continue
    attributes = event.get_attributes()
    data = event.get_data()
    if isinstance(data, (bytes, bytearray)):
        data = {"hex": bytes(data).hex()}
    elif isinstance(data, str):
        data = {"text": data}
    print(json.dumps({
        "ok": True,
        "attributes": {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in attributes.items() if k in CORE},
        "extensions": {k: v for k, v in attributes.items() if k not in CORE},
        "data": data,
    }))
