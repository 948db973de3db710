"""Development helpers: a local embedding server and a sample corpus."""
