"""The in-process RSS profiler (anon / file split, phase marks, JSON timelines) and its matplotlib plots."""
