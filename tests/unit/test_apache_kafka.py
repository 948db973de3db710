"""The Apache Kafka launcher's own logic (starting brokers is the integration tests' job)."""

from __future__ import annotations

from pathlib import Path

from worker.dev.apache_kafka import KafkaCluster, KafkaNode


def test_cluster_ids_are_what_the_storage_tool_takes(tmp_path: Path) -> None:
    # 22 URL-safe base64 characters, and never a leading "-" (the tool would read an option):
    # with random ids one in 64 starts that way, so 2,000 draws all but surely meet one.
    ids = [KafkaCluster(tmp_path, nodes=[KafkaNode(1, tmp_path)]).cluster_id for _ in range(2000)]
    assert all(len(i) == 22 and not i.startswith("-") for i in ids)
    assert len(set(ids)) == len(ids)


def test_server_properties_replicate_across_the_cluster_and_take_overrides(tmp_path: Path) -> None:
    cluster = KafkaCluster(tmp_path, size=3, properties={"group.initial.rebalance.delay.ms": 3000})
    voters = ",".join(f"{n.node_id}@127.0.0.1:{n.controller_port}" for n in cluster.nodes)
    node = cluster.nodes[1]
    node.write_properties(voters, replicas=3, overrides=cluster.properties, certificates=cluster.certificates)
    lines = dict(line.split("=", 1) for line in node.properties_path.read_text().splitlines())
    assert lines["node.id"] == "2"
    assert lines["controller.quorum.voters"] == voters
    assert lines["default.replication.factor"] == "3"
    assert lines["min.insync.replicas"] == "2"
    assert lines["offsets.topic.replication.factor"] == "3"
    assert lines["group.initial.rebalance.delay.ms"] == "3000"
    assert f"PLAINTEXT://127.0.0.1:{node.port}" in lines["advertised.listeners"]
    assert cluster.bootstrap.count(",") == 2
    # The TLS listeners read the cluster's own certificates, made in its workdir.
    assert f"SSL://127.0.0.1:{node.ssl_port}" in lines["advertised.listeners"]
    assert f"SASL_SSL://127.0.0.1:{node.sasl_ssl_port}" in lines["advertised.listeners"]
    assert Path(lines["ssl.keystore.location"]).is_file()
    assert lines["listener.name.ssl.ssl.client.auth"] == "required"
