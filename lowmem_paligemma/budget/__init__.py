"""What fits: memory (a request's KV cache and activations), residency (which layers stay under a budget), layout
(where a streamed layer sits in its buffer), streamer (reading streamed layers per forward, ahead of use)."""
