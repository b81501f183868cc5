"""The ``nitsum`` command line."""
