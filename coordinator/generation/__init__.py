"""Text generation across KV-cache shards: the token choice (``sampling``) and the session driver (``session``)."""
