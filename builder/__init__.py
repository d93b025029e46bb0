"""Build-time tools: the tiny random-weight checkpoint (make_tiny_checkpoint), the real weights'
download (download_weights) and the local development script (dev.sh)."""
