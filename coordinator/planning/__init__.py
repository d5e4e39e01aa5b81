"""Planning, with no I/O of its own: cut a graph into shards and choose a browser and platform for each."""
