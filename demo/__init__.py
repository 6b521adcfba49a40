"""The offline demo's library (scripts/demo.py): its corpus and downstream tasks, tokenizer and model configs
made from scratch, running each step's script with its log, and the results table; and the rerunnable multi-seed
measurement the experiments share (protocol.py)."""
