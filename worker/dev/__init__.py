"""Development helpers: the local stacks (Tansu or Apache Kafka), an embedding server, a sample corpus."""
