"""The benchmark's library (scripts/benchmark.py): configurations and FLOPs, the original scripts' step as the
reference, our step against it on the same batches, FSDP2 memory per rank."""
