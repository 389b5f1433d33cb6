"""The built-in spurious-background benchmark (data generator and runner)."""
