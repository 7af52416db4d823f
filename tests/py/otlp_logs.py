"""Ships a log file to logvault through Python logging and the official
OpenTelemetry SDK's OTLP/HTTP log exporter (protobuf), one record per line
at the level the line names.

usage: otlp_logs.py URL CA_FILE TOKEN LOG_FILE SERVICE
"""
import logging
import sys

from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
from opentelemetry.sdk._logs import LoggerProvider, LoggingHandler
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
from opentelemetry.sdk.resources import Resource

url, ca, token, path, service = sys.argv[1:6]
provider = LoggerProvider(
    resource=Resource.create({"service.name": service, "host.name": "claimed-by-payload"})
)
exporter = OTLPLogExporter(
    endpoint=url + "/v1/logs",
    certificate_file=ca,
    headers={"authorization": "Bearer " + token},
    timeout=30,
)
# A queue that holds the whole file: the SDK drops what overflows it.
provider.add_log_record_processor(
    BatchLogRecordProcessor(exporter, max_queue_size=10_000, max_export_batch_size=512)
)
logger = logging.getLogger("spark")
logger.setLevel(logging.DEBUG)
logger.propagate = False
logger.addHandler(LoggingHandler(level=logging.DEBUG, logger_provider=provider))
levels = {"WARN": logging.WARNING, "ERROR": logging.ERROR, "INFO": logging.INFO}
with open(path, encoding="utf-8", errors="replace") as lines:
    for line in lines.read().splitlines():
        words = line.split(" ")
        level = levels.get(words[2] if len(words) > 2 else "", logging.INFO)
        logger.log(level, line)
if not provider.force_flush(60_000):
    sys.exit("the exporter did not flush")
provider.shutdown()
print("shipped")
