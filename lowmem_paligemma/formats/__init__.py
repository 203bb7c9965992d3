"""Weight formats and their kernels: base (what a format declares), dense, int8, int4 (one module each), registry
(the list every other place asks), kernels (a plan put on a model), chooser (timing the candidates on this machine,
cached), compressed (compressed-tensors' config block)."""
