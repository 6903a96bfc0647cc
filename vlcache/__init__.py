"""vlcache: KV-cache compression for vision-language models."""
