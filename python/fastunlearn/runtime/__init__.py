"""Process-wide concerns: backend discovery, memory, timing phases and profiling."""
