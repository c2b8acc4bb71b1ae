"""AWS's aws-kinesis-agg (PyPI) for tests/src/kpl.rs: KPL aggregation by an
implementation independent of ingest's.

`kpl_agg.py aggregate [MAX_SIZE]`: stdin is a JSON array of
[partition_key, data_hex]; stdout a JSON array of the aggregated Kinesis
records, in order, each [partition_key, data_hex]. MAX_SIZE is the
aggregator's limit in bytes (default: Kinesis's 1 MiB).

`kpl_agg.py deaggregate`: stdin is the hex of one Kinesis record; stdout a
JSON array of its user records, each [partition_key, sub_sequence, data_hex].
"""

import base64
import json
import sys

from aws_kinesis_agg.aggregator import RecordAggregator
from aws_kinesis_agg.deaggregator import deaggregate_records


def aggregate(max_size):
    aggregator = RecordAggregator(max_size) if max_size else RecordAggregator()
    aggregated = []

    def keep(record):
        partition_key, _, data = record.get_contents()
        aggregated.append([partition_key, data.hex()])

    for partition_key, data_hex in json.load(sys.stdin):
        full = aggregator.add_user_record(partition_key, bytes.fromhex(data_hex))
        if full is not None:
            keep(full)
    last = aggregator.clear_and_get()
    if last is not None:
        keep(last)
    json.dump(aggregated, sys.stdout)


def deaggregate():
    data = bytes.fromhex(sys.stdin.read().strip())
    # The Lambda event shape the library reads.
    record = {"kinesis": {"kinesisSchemaVersion": "1.0", "partitionKey": "outer",
                          "sequenceNumber": "1", "approximateArrivalTimestamp": 0,
                          "data": base64.b64encode(data).decode()}}
    users = deaggregate_records([record])
    json.dump([[u["kinesis"]["partitionKey"], u["kinesis"].get("subSequenceNumber"),
                base64.b64decode(u["kinesis"]["data"]).hex()] for u in users], sys.stdout)


if __name__ == "__main__":
    if sys.argv[1] == "aggregate":
        aggregate(int(sys.argv[2]) if len(sys.argv) > 2 else None)
    elif sys.argv[1] == "deaggregate":
        deaggregate()
    else:
        sys.exit("usage: kpl_agg.py aggregate [MAX_SIZE] | deaggregate")
