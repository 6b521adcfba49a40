"""What only multi-process runs need: FSDP2 sharding, a model's transformer blocks (the units FSDP shards and
--compile compiles) and weights streamed from memory-mapped safetensors onto meta-device models."""
