"""Ships a log file to logvault with the official Elasticsearch client's
bulk helper, then sends one bulk request holding a malformed item, and
prints what the client saw as JSON on the last line.

usage: es_bulk.py URL CA_FILE AUTH LOG_FILE INDEX

AUTH is a bearer token, or cert:CERT_FILE:KEY_FILE for a client certificate.
"""
import json
import sys

from elasticsearch import Elasticsearch, helpers

url, ca, auth, path, index = sys.argv[1:6]
if auth.startswith("cert:"):
    _, cert, key = auth.split(":", 2)
    es = Elasticsearch(url, ca_certs=ca, client_cert=cert, client_key=key, request_timeout=60)
else:
    es = Elasticsearch(url, ca_certs=ca, bearer_auth=auth, request_timeout=60)
info = es.info()


def actions():
    with open(path, encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines.read().splitlines()):
            yield {
                "_index": index,
                "_id": str(number),
                "message": line,
                "host": {"name": "claimed-by-payload"},
                "line_number": number,
            }


shipped, errors = helpers.bulk(es, actions(), chunk_size=500, max_retries=5, raise_on_error=False)
mixed = es.bulk(
    operations=[
        {"index": {"_index": index}},
        {"message": "a good item beside a bad one"},
        {"index": {"_index": index}},
        {"@timestamp": "not a time", "message": "a bad item"},
    ]
)
print(
    json.dumps(
        {
            "version": info["version"]["number"],
            "shipped": shipped,
            "errors": len(errors),
            "mixed_errors": mixed["errors"],
            "mixed_statuses": [next(iter(item.values()))["status"] for item in mixed["items"]],
        }
    )
)
