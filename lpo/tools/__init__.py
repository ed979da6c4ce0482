"""Tools (layer 5): commands built on the stages and procedures, not pipeline stages themselves (bench)."""
