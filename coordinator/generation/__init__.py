"""Text generation across KV-cache shards: the token choice (``sampling``), the session driver (``session``),
and speech to token ids with a Whisper encoder and decoder (``speech``, its decoding rules ``decoding``)."""
