"""Local lm-evaluation-harness tasks (YAML + small JSONL data) that run offline; see molm/tasks/README.md."""
