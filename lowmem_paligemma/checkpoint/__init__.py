"""Files to parameters, for any module built on meta (nothing here knows PaliGemma): safetensors_io (the format, the
one dtype table, pread, the shard writer), loader (match, pre-flight, materialise, stream in chunks), preflight (what
a load needs, refused before allocating), pagecache (residency, dropping, O_DIRECT), verify (shard checksums)."""
