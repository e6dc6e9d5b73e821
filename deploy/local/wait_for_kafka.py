"""Wait until a Kafka broker answers a metadata request.

usage: wait_for_kafka.py BOOTSTRAP TIMEOUT_SECONDS
Exit 0 once a broker is listed, 1 if none answered in time.
"""

import contextlib
import sys
import time

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient


def main() -> int:
    bootstrap, timeout = sys.argv[1], float(sys.argv[2])
    deadline = time.monotonic() + timeout
    # log_level 0 keeps librdkafka quiet about refused connections while the broker starts.
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return 1
        with contextlib.suppress(KafkaException):  # timeouts and refused connections
            if admin.list_topics(timeout=min(left, 5.0)).brokers:
                return 0
        time.sleep(min(0.5, max(deadline - time.monotonic(), 0)))


if __name__ == "__main__":
    sys.exit(main())
