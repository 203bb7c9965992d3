"""What front ends call: session (load once, run prompts, size requests), draw (boxes and masks onto images), batch
(a folder into resumable JSONL), ray_batch (the same on a Ray cluster), server/ (the HTTP server)."""
