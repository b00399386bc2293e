"""molm: a fast, faithful ModuleFormer / MoLM implementation."""
