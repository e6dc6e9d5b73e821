"""The services the integration tier runs against are real: MariaDB/MySQL and Apache Kafka."""

from __future__ import annotations

import json
import uuid

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic
from sqlalchemy import JSON, Column, Integer, MetaData, Table, create_engine, insert, select


def test_mysql_json_column_round_trips_through_sqlalchemy_core_and_mysqlclient(
    fresh_mysql_url: str,
) -> None:
    engine = create_engine(fresh_mysql_url)
    assert engine.dialect.driver == "mysqldb"
    meta = MetaData()
    docs = Table("smoke_docs", meta, Column("id", Integer, primary_key=True), Column("doc", JSON))
    meta.create_all(engine)
    value = {"name": "é✓", "items": [1, 2.5, None], "nested": {"ok": True}}
    with engine.begin() as conn:
        conn.execute(insert(docs).values(id=1, doc=value))
    with engine.connect() as conn:
        assert conn.execute(select(docs.c.doc).where(docs.c.id == 1)).scalar_one() == value
        version = conn.exec_driver_sql("SELECT VERSION()").scalar_one()
    assert isinstance(version, str)
    assert version[0].isdigit()
    engine.dispose()


def _topic(admin: AdminClient, partitions: int) -> str:
    name = f"smoke-{uuid.uuid4().hex[:10]}"
    for future in admin.create_topics([NewTopic(name, num_partitions=partitions)]).values():
        future.result(timeout=30)
    return name


def test_kafka_topic_with_three_partitions_through_a_consumer_group(kafka: str) -> None:
    admin = AdminClient({"bootstrap.servers": kafka})
    topic = _topic(admin, 3)
    assert len(admin.list_topics(topic, timeout=10).topics[topic].partitions) == 3
    producer = Producer({"bootstrap.servers": kafka, "enable.idempotence": True, "acks": "all"})
    sent = {f"key-{n}": f"value-{n}" for n in range(30)}
    for key, value in sent.items():
        producer.produce(topic, key=key, value=value)
    assert producer.flush(30) == 0
    consumer = Consumer(
        {
            "bootstrap.servers": kafka,
            "group.id": f"smoke-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    received: dict[str, str] = {}
    partitions: set[int] = set()
    for _ in range(120):
        msg = consumer.poll(1.0)
        if msg is None or msg.error():
            if len(received) == len(sent):
                break
            continue
        received[msg.key().decode()] = msg.value().decode()
        partitions.add(msg.partition())
        consumer.commit(message=msg, asynchronous=False)
    consumer.close()
    assert received == sent
    assert partitions == {0, 1, 2}


def test_idempotent_producer_with_acks_all_delivers_each_message_once(kafka: str) -> None:
    admin = AdminClient({"bootstrap.servers": kafka})
    topic = _topic(admin, 1)
    reports: list[tuple[int, int]] = []
    producer = Producer({"bootstrap.servers": kafka, "enable.idempotence": True, "acks": "all"})
    for n in range(10):
        producer.produce(
            topic,
            value=json.dumps({"n": n}).encode(),
            on_delivery=lambda err, msg: reports.append((0 if err is None else 1, msg.offset())),
        )
    assert producer.flush(30) == 0
    assert [ok for ok, _ in reports] == [0] * 10
    assert sorted(offset for _, offset in reports) == list(range(10))
