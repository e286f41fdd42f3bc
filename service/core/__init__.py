"""The pure core: contract, batching, offsets, ordering. No Kafka, no HTTP, no I/O."""
